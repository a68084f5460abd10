/* SPDX-License-Identifier: GPL-2.0 */
/* Source NAT: rule lookup, external address and port allocation, and the header rewrites. */
#ifndef NATD_NAT_H
#define NATD_NAT_H

#include "maps.h"
#include "csum.h"
#include "conntrack.h"

/* Bounded so the verifier can walk it; random start, then sequential probing (RFC 6056 alg. 1 style).
 * A range that is nearly full for one destination can report exhaustion early: counted, never evicts. */
#define NAT_PORT_TRIES 32

static __always_inline struct snat_rule *snat_rule_for(__be32 addr)
{
	struct lpm_v4_key k = { .prefixlen = 32, .addr = addr };

	return snat_rules.lookup(&k);
}

/* Forwarded ports are reserved: never handed to an outbound flow. */
static __always_inline int port_forwarded(__be32 ext, __be16 port, __u8 proto)
{
	struct dnat_key dk = { .addr = ext, .port = port, .proto = proto };

	return dnat_rules.lookup(&dk) != NULL;
}

/* The second half of a new flow: the reply half (rk) is in already; insert the entry or take the reply
 * half back out, so no half survives alone. 0, 1 (another CPU created it first) or -1 with *reason. */
static __always_inline int ct_commit(struct ct_key *orig, struct ct_key *rk, __be32 ext, __u8 state, __u8 flags,
				     __u32 rule_id, __u32 *reason)
{
	struct ct_entry e = {};
	int err;

	e.created_ns = bpf_ktime_get_coarse_ns();  /* the clock of last_seen_ns (ct_update) */
	e.last_seen_ns = e.created_ns;
	e.nat_addr = ext;
	e.nat_port = rk->dport;
	e.state = state;
	e.flags = flags;
	e.rule_id = rule_id;
	err = ct_orig.insert(orig, &e);
	if (!err) {
		stat_count(STAT_CT_NEW, 0);
		nat_event_emit(NAT_EVENT_NEW, orig, &e);
		return 0;
	}
	ct_reply.delete(rk);
	if (err == -EEXIST) {
		stat_count(STAT_CT_CREATE_RACE, 0);
		return 1;
	}
	*reason = STAT_DROP_TABLE_FULL;
	return -1;
}

static __always_inline __u32 eim_hash(const struct ct_key *orig)
{
	__u32 h = bpf_ntohl(orig->saddr) * 2654435761u;

	h ^= ((__u32)bpf_ntohs(orig->sport) << 8 | orig->proto) * 2246822519u;
	return h ^ (h >> 15);
}

/* Under endpoint-independent filtering an external port identifies exactly one inside endpoint
 * (RFC 4787 §5): a port is taken when another endpoint owns it and still has a live flow. */
static __always_inline int eif_port_taken(__be32 ext, __be16 port, const struct ct_key *orig)
{
	struct ext_endpoint ep = { .addr = ext, .port = port, .proto = orig->proto };
	struct ct_key *anchor = eif_owners.lookup(&ep);

	if (!anchor)
		return 0;
	if (anchor->saddr == orig->saddr && anchor->sport == orig->sport)
		return 0;
	return ct_orig.lookup(anchor) != NULL;
}

/* The newest flow becomes the owner's anchor: the mapping stays open to new remotes while that flow
 * lives (an older, longer-lived flow of the same endpoint does not hold it open; the endpoint's next
 * new flow re-anchors it). */
static __always_inline void eif_claim(__be32 ext, __be16 port, struct ct_key *orig)
{
	struct ext_endpoint ep = { .addr = ext, .port = port, .proto = orig->proto };

	eif_owners.update(&ep, orig);
}

/* The ct_reply key of a flow (mirrors natd.maps.reply_key_for). */
static __always_inline void ct_key_reply(const struct ct_key *orig, const struct ct_entry *e, struct ct_key *rk)
{
	rk->saddr = orig->daddr;
	rk->daddr = e->nat_addr;
	rk->sport = orig->proto == IPPROTO_ICMP ? 0 : orig->dport;
	rk->dport = e->nat_port;
	rk->proto = orig->proto;
}

/* Paired pooling (RFC 4787 REQ-2): the inside address alone picks the external address. */
static __always_inline int snat_pick_addr(const struct snat_rule *r, __be32 inside, __be32 *ext)
{
	__u32 size = r->pool_size;
	__u32 idx;
	__be32 *addr;

	if (size == 0)
		return -1;
	idx = r->pool_index + (bpf_ntohl(inside) * 2654435761u >> 8) % size;
	addr = snat_pool.lookup(&idx);
	if (!addr || !*addr)
		return -1;
	*ext = *addr;
	return 0;
}

/* Claims an external port for the flow and creates both halves of the entry. Returns 0 and fills *out,
 * or 1 when another CPU created the same flow first (look it up again), or -1 with *reason set.
 * The reply half goes in first: inserting it with BPF_NOEXIST is the atomic port claim, unique per
 * (external addr, proto, remote addr, remote port). No half survives alone: a failed second insert
 * removes the first. */
static __always_inline int snat_create(struct ct_key *orig, const struct snat_rule *r, __be32 ext,
				       __u8 state, __u32 *reason)
{
	struct ct_key rk = {
		.saddr = orig->daddr,
		.daddr = ext,
		.sport = orig->dport,
		.proto = orig->proto,
	};
	struct ct_reply_value rv = { .orig = *orig };
	__u16 want = bpf_ntohs(orig->sport);
	__u32 lo = r->port_min, hi = r->port_max;
	__u32 start, i, range, port;
	int eif = r->flags & SNAT_F_EIF;
	int err;

	/* RFC 4787 REQ-3a / RFC 5382: keep the inside port when it is free. */
	if (want >= r->port_min && want <= r->port_max && !port_forwarded(ext, orig->sport, orig->proto) &&
	    !(eif && eif_port_taken(ext, orig->sport, orig))) {
		rk.dport = orig->sport;
		err = ct_reply.insert(&rk, &rv);
		if (!err)
			goto claimed;
		if (err != -EEXIST)
			goto full;
	}
	/* RFC 4787 REQ-3a: ports 0-1023 stay below 1024 and others above, when the range has both. */
	if (want < 1024 && lo < 1024)
		hi = hi < 1023 ? hi : 1023;
	else if (want >= 1024 && hi >= 1024)
		lo = lo > 1024 ? lo : 1024;
	range = hi - lo + 1;
	/* Endpoint-independent mapping (RFC 4787 REQ-1, RFC 5382 REQ-1) without a mapping table: the first
	 * candidate is a function of the inside endpoint alone, so every destination gets the same external
	 * port unless another endpoint already holds it towards that very destination (then the next one;
	 * RFC 7857 §3 allows the per-destination reuse that makes this rare). */
	start = r->flags & SNAT_F_APDM ? bpf_get_prandom_u32() : eim_hash(orig);
	for (i = 0; i < NAT_PORT_TRIES; i++) {
		port = lo + (start + i) % range;
		/* RFC 4787 REQ-4 (SHOULD): the first half of the tries keep the source port's parity
		 * (RTP/RTCP pairs); the second half take any port, so parity never causes exhaustion. */
		if (i < NAT_PORT_TRIES / 2 && (port ^ want) & 1 && (port ^ 1) >= lo && (port ^ 1) <= hi)
			port ^= 1;
		rk.dport = bpf_htons((__u16)port);
		if (port_forwarded(ext, rk.dport, orig->proto) || (eif && eif_port_taken(ext, rk.dport, orig)))
			continue;
		err = ct_reply.insert(&rk, &rv);
		if (!err)
			goto claimed;
		if (err != -EEXIST)
			goto full;
	}
	*reason = STAT_DROP_PORT_EXHAUSTED;
	return -1;

claimed:
	if (eif)
		eif_claim(ext, rk.dport, orig);
	return ct_commit(orig, &rk, ext, state, 0, r->rule_id, reason);
full:
	*reason = STAT_DROP_TABLE_FULL;
	return -1;
}

/* A flow opened from the internet: rk is the packet's own (reply-side) tuple, the inside endpoint comes
 * from a port forward or a static 1:1 mapping. Same two halves as an outbound flow, created the other
 * way round; returns like snat_create. */
static __always_inline int inbound_create(struct ct_key *rk, __be32 inside, __be16 inside_port, __u8 state,
					  __u32 rule_id, __u32 *reason)
{
	struct ct_reply_value rv = {
		.orig = {
			.saddr = inside,
			.daddr = rk->saddr,
			.sport = inside_port,
			.dport = rk->sport,
			.proto = rk->proto,
		},
	};
	int err;

	err = ct_reply.insert(rk, &rv);
	if (err == -EEXIST) {
		stat_count(STAT_CT_CREATE_RACE, 0);
		return 1;
	}
	if (err) {
		*reason = STAT_DROP_TABLE_FULL;
		return -1;
	}
	err = ct_commit(&rv.orig, rk, rk->daddr, state, CT_F_INBOUND, rule_id, reason);
	if (!err)
		stat_count(STAT_CT_NEW_INBOUND, 0);
	return err;
}

/* Where a new inbound flow to rk's external address/port goes: a port forward first, then a static 1:1
 * mapping (any port). -1 when neither exists. */
static __always_inline int inbound_target(struct ct_key *rk, __be32 *addr, __be16 *port, __u32 *rule_id)
{
	struct dnat_key dk = { .addr = rk->daddr, .port = rk->dport, .proto = rk->proto };
	struct ext_endpoint ep = {};
	struct ct_entry *owner;
	struct dnat_target *t;
	struct ct_key *anchor;
	__be32 *inside;

	if (rk->proto == IPPROTO_ICMP)
		return -1;
	t = dnat_rules.lookup(&dk);
	if (t) {
		*addr = t->addr;
		*port = t->port;
		*rule_id = NATD_RULE_FORWARD;
		return 0;
	}
	inside = static_in.lookup(&rk->daddr);
	if (inside) {
		*addr = *inside;
		*port = rk->dport;
		*rule_id = NATD_RULE_STATIC;
		return 0;
	}
	/* endpoint-independent filtering: anyone may reach a live mapping's inside endpoint */
	ep.addr = rk->daddr;
	ep.port = rk->dport;
	ep.proto = rk->proto;
	anchor = eif_owners.lookup(&ep);
	owner = anchor ? ct_orig.lookup(anchor) : NULL;
	if (anchor && owner && owner->nat_addr == rk->daddr && owner->nat_port == rk->dport) {
		*addr = anchor->saddr;
		*port = anchor->sport;
		*rule_id = owner->rule_id;
		return 0;
	}
	return -1;
}

/* Rewrite source address and port (egress). */
static __always_inline void snat_rewrite(struct iphdr *ip, struct l4_fields *f, __be32 addr, __be16 port)
{
	if (!(f->udp && *f->csum == 0)) {
		if (f->pseudo)
			nat_csum_replace4(f->csum, ip->saddr, addr);
		nat_csum_replace2(f->csum, *f->sport, port);
		if (f->udp && *f->csum == 0)
			*f->csum = 0xffff;
	}
	*f->sport = port;
	nat_csum_replace4(&ip->check, ip->saddr, addr);
	ip->saddr = addr;
}

/* Rewrite destination address and port (replies coming back in). */
static __always_inline void dnat_rewrite(struct iphdr *ip, struct l4_fields *f, __be32 addr, __be16 port)
{
	if (!(f->udp && *f->csum == 0)) {
		if (f->pseudo)
			nat_csum_replace4(f->csum, ip->daddr, addr);
		nat_csum_replace2(f->csum, *f->dport, port);
		if (f->udp && *f->csum == 0)
			*f->csum = 0xffff;
	}
	*f->dport = port;
	nat_csum_replace4(&ip->check, ip->daddr, addr);
	ip->daddr = addr;
}

/* The flow of a packet from an inside host, found or created (static 1:1 mapping first, else the snat
 * rule of its source). 0 with *ep set, or -1 with *reason (a drop reason). */
static __always_inline int nat_out_flow(struct ct_key *key, const struct l4_fields *f, struct ct_entry **ep,
					__u32 *reason)
{
	struct snat_rule static_rule = {};
	struct snat_rule *rule;
	struct ct_entry *e;
	__be32 *static_ext;
	__be32 ext;

	e = ct_orig.lookup(key);
	if (e) {
		*ep = e;
		return 0;
	}
	/* A RST for a flow natd does not know has nothing to close. */
	if (f->tcp && f->tcp->rst) {
		*reason = STAT_DROP_NO_MAPPING;
		return -1;
	}
	static_ext = static_out.lookup(&key->saddr);
	if (static_ext) {
		/* static 1:1 NAT keeps the port: a one-port "range" */
		static_rule.rule_id = NATD_RULE_STATIC;
		static_rule.port_min = bpf_ntohs(key->sport);
		static_rule.port_max = static_rule.port_min;
		rule = &static_rule;
		ext = *static_ext;
	} else {
		rule = snat_rule_for(key->saddr);
		if (!rule) {
			*reason = STAT_DROP_SPOOFED_INSIDE;
			return -1;
		}
		if (snat_pick_addr(rule, key->saddr, &ext) < 0) {
			*reason = STAT_DROP_PORT_EXHAUSTED;
			return -1;
		}
	}
	if (snat_create(key, rule, ext, ct_initial_state(f->tcp), reason) < 0)
		return -1;
	e = ct_orig.lookup(key);
	if (!e) {
		*reason = STAT_DROP_TABLE_FULL;
		return -1;
	}
	*ep = e;
	return 0;
}

#define NAT_IN_FOUND 0
#define NAT_IN_NO_MAPPING 1  /* nothing behind that external endpoint for this sender */
#define NAT_IN_PASS 2        /* give it to the kernel untranslated; *reason says why */
#define NAT_IN_DROP (-1)     /* *reason says why */

/* The flow of a packet addressed to an external endpoint (rk: its tuple as the internet sends it), found
 * or opened through a port forward or static mapping. A new inbound flow needs a TCP SYN (a stray
 * segment must not open state) and a TTL that survives the hop. */
static __always_inline int nat_in_flow(struct ct_key *rk, const struct l4_fields *f, __u8 ttl,
				       struct ct_reply_value **rvp, struct ct_entry **ep, __u32 *reason)
{
	struct ct_reply_value *rv;
	struct ct_entry *e;
	__be16 inside_port;
	__be32 inside;
	__u32 rule_id;

	rv = ct_reply.lookup(rk);
	e = rv ? ct_orig.lookup(&rv->orig) : NULL;
	if (!e && inbound_target(rk, &inside, &inside_port, &rule_id) == 0) {
		if (ttl <= 1) {
			*reason = STAT_PASS_TTL;
			return NAT_IN_PASS;
		}
		if (f->tcp && !(f->tcp->syn && !f->tcp->ack)) {
			*reason = STAT_DROP_NO_MAPPING;
			return NAT_IN_DROP;
		}
		if (inbound_create(rk, inside, inside_port, ct_initial_state(f->tcp), rule_id, reason) < 0)
			return NAT_IN_DROP;
		rv = ct_reply.lookup(rk);
		e = rv ? ct_orig.lookup(&rv->orig) : NULL;
		if (!e) {
			*reason = STAT_DROP_NO_MAPPING;
			return NAT_IN_DROP;
		}
	}
	if (!e || !rv)
		return NAT_IN_NO_MAPPING;
	*rvp = rv;
	*ep = e;
	return NAT_IN_FOUND;
}

#endif /* NATD_NAT_H */

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

/* The first port an endpoint-independent mapping tries when it cannot keep the inside port: a function
 * of the inside endpoint and natd's secret (struct nat_secret), so the same endpoint comes back on the
 * same port while the outside cannot predict it (RFC 7857 §9, RFC 6056 §3.3.3 in spirit: keyed, though
 * not a cryptographic hash). */
static __always_inline __u32 eim_hash(const struct ct_key *orig)
{
	__u32 zero = 0;
	struct nat_secret *sk = nat_secret.lookup(&zero);
	__u32 k0 = sk ? sk->key[0] : 0, k1 = sk ? sk->key[1] : 0, k2 = sk ? sk->key[2] : 0;
	__u32 h = (bpf_ntohl(orig->saddr) ^ k0) * 2654435761u;

	h ^= (((__u32)bpf_ntohs(orig->sport) << 8 | orig->proto) ^ k1) * 2246822519u;
	h ^= h >> 15;
	h = (h ^ k2) * 3266489917u;
	return h ^ (h >> 13);
}

/* The nat_mappings key of a flow (struct nat_mapping; mirrors natd.maps.mapping_key_for). */
static __always_inline void mapping_key_of(const struct ct_key *orig, int apdm, struct ct_key *mk)
{
	*mk = *orig;
	if (!apdm) {
		mk->daddr = 0;
		mk->dport = 0;
	}
}

/* The inside endpoint that owns an external port, if its mapping still holds that port. */
static __always_inline struct ct_key *port_owner_live(struct ext_endpoint *ep, struct nat_mapping **mp)
{
	struct ct_key *owner = port_owners.lookup(ep);
	struct nat_mapping *m;

	if (!owner)
		return NULL;
	m = nat_mappings.lookup(owner);
	if (!m || m->ext_addr != ep->addr || m->ext_port != ep->port)
		return NULL;
	if (mp)
		*mp = m;
	return owner;
}

/* Claim an external port for mapping mk alone: BPF_NOEXIST makes two CPUs racing for one port agree.
 * A claim whose mapping is gone (natd deletes the claim first, so only a failed create leaves one) is
 * taken over. 0 when claimed. */
static __always_inline int port_claim(__be32 ext, __be16 port, const struct ct_key *mk)
{
	struct ext_endpoint ep = { .addr = ext, .port = port, .proto = mk->proto };

	if (!port_owners.insert(&ep, (struct ct_key *)mk))
		return 0;
	if (port_owner_live(&ep, NULL))
		return -1;
	return port_owners.update(&ep, (struct ct_key *)mk);
}

static __always_inline void port_release(__be32 ext, __be16 port, __u8 proto)
{
	struct ext_endpoint ep = { .addr = ext, .port = port, .proto = proto };

	port_owners.delete(&ep);
}

/* Claim the reply half for rk (rk->dport the candidate port): 0 when claimed, 1 when the port is busy
 * towards this remote (its port claim, if this flow made one, given back), -1 when the table is full. */
static __always_inline int port_try(struct ct_key *rk, struct ct_reply_value *rv, int *owned)
{
	int err = ct_reply.insert(rk, rv);

	if (!err)
		return 0;
	if (*owned)
		port_release(rk->daddr, rk->dport, rk->proto);
	*owned = 0;
	return err == -EEXIST ? 1 : -1;
}

/* RFC 6888 REQ-4: count one more external port for an inside address; -1 (nothing counted) when that
 * would pass the rule's limit. The add is atomic; the check after it may refuse one port early when
 * CPUs race at the limit, never let one through. */
static __always_inline int host_port_take(__be32 host, __u32 limit)
{
	__u32 zero = 0, *n;

	n = host_ports.lookup(&host);
	if (!n) {
		host_ports.insert(&host, &zero);
		n = host_ports.lookup(&host);
		if (!n)
			return limit ? -1 : 0;  /* table of hosts full: only a capped rule must refuse */
	}
	__sync_fetch_and_add(n, 1);
	if (limit && *n > limit) {
		__sync_fetch_and_add(n, -1);
		return -1;
	}
	return 0;
}

static __always_inline void host_port_give(__be32 host)
{
	__u32 *n = host_ports.lookup(&host);

	if (n)
		__sync_fetch_and_add(n, -1);
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
 * removes the first.
 *
 * Mappings (RFC 4787 REQ-1, RFC 5382 REQ-1, RFC 5508 REQ-1a): an inside endpoint with a mapping gets its
 * port towards every remote. A new mapping takes a port no other endpoint owns (port_owners), so that
 * port can only be busy towards a remote if the endpoint itself holds it. Only when the tries run out
 * of unowned ports does a new mapping share one, as RFC 7857 §3 lets a NAT reuse a port for different
 * destinations, and never under endpoint-independent filtering, where the port must name one endpoint. */
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
	struct nat_mapping nm = {};
	struct nat_mapping *m;
	struct ct_key mk;
	__u16 want = bpf_ntohs(orig->sport);
	__u32 lo = r->port_min, hi = r->port_max;
	__u32 start, i, range, port;
	int apdm = r->flags & SNAT_F_APDM;
	int eif = r->flags & SNAT_F_EIF;
	int new_mapping = 0;  /* this flow makes its endpoint's mapping: counts for the host, claims a port */
	int want_owner = 0;   /* ... and that port must be its own (EIM, or any mapping under EIF) */
	int owned = 0, err, rc;

	mapping_key_of(orig, apdm, &mk);
	if (r->rule_id != NATD_RULE_STATIC) {
		m = nat_mappings.lookup(&mk);
		if (m && m->ext_addr == ext) {
			rk.dport = m->ext_port;
			err = ct_reply.insert(&rk, &rv);
			if (!err) {
				m->last_used_ns = bpf_ktime_get_coarse_ns();
				return ct_commit(orig, &rk, ext, state, 0, r->rule_id, reason);
			}
			if (err != -EEXIST)
				goto full;
			/* The mapping's port is busy towards this remote, so it is a shared port (the endpoint's
			 * own flow to that remote would have been found). This flow gets a port of its own and
			 * the mapping stays: counted, it is where EIM gives way (RFC 7857 §3). */
			stat_count(STAT_EIM_COLLISION, 0);
		} else {
			/* A mapping on another address (the rule's pool changed on reload) makes way for
			 * one on the new address; its flows keep theirs. */
			if (m) {
				nat_mappings.delete(&mk);
				host_port_give(orig->saddr);
			}
			if (host_port_take(orig->saddr, r->host_port_limit) < 0) {
				*reason = STAT_DROP_HOST_PORT_LIMIT;
				return -1;
			}
			new_mapping = 1;
			want_owner = !apdm || eif;
		}
	}

	/* RFC 4787 REQ-3a / RFC 5382: keep the inside port when it is free. */
	if (want >= r->port_min && want <= r->port_max && !port_forwarded(ext, orig->sport, orig->proto)) {
		rk.dport = orig->sport;
		owned = want_owner && !port_claim(ext, rk.dport, &mk);
		if (owned || !want_owner) {
			rc = port_try(&rk, &rv, &owned);
			if (!rc)
				goto claimed;
			if (rc < 0)
				goto fail_full;
		}
	}
	/* RFC 4787 REQ-3a: ports 0-1023 stay below 1024 and others above, when the range has both. */
	if (want < 1024 && lo < 1024)
		hi = hi < 1023 ? hi : 1023;
	else if (want >= 1024 && hi >= 1024)
		lo = lo > 1024 ? lo : 1024;
	range = hi - lo + 1;
	/* The first candidate is a function of the inside endpoint alone, so a mapping that is released and
	 * made again comes back on the same port if it is free; under APDM a random start per flow. */
	start = apdm ? bpf_get_prandom_u32() : eim_hash(orig);
	for (i = 0; i < NAT_PORT_TRIES; i++) {
		port = lo + (start + i) % range;
		/* RFC 4787 REQ-4 (SHOULD): the first half of the tries keep the source port's parity
		 * (RTP/RTCP pairs); the second half take any port, so parity never causes exhaustion. */
		if (i < NAT_PORT_TRIES / 2 && (port ^ want) & 1 && (port ^ 1) >= lo && (port ^ 1) <= hi)
			port ^= 1;
		rk.dport = bpf_htons((__u16)port);
		if (port_forwarded(ext, rk.dport, orig->proto))
			continue;
		/* the last quarter of the tries may share an owned port, except under EIF */
		if (want_owner) {
			owned = !port_claim(ext, rk.dport, &mk);
			if (!owned && (eif || i < NAT_PORT_TRIES * 3 / 4))
				continue;
		}
		rc = port_try(&rk, &rv, &owned);
		if (!rc)
			goto claimed;
		if (rc < 0)
			goto fail_full;
	}
	*reason = STAT_DROP_PORT_EXHAUSTED;
	goto fail;

claimed:
	rc = ct_commit(orig, &rk, ext, state, 0, r->rule_id, reason);
	if (!new_mapping)
		return rc;
	if (rc) {
		if (owned)
			port_release(ext, rk.dport, orig->proto);
		host_port_give(orig->saddr);
		return rc;
	}
	if (want_owner && !owned)
		stat_count(STAT_EIM_PORT_SHARED, 0);
	nm.last_used_ns = bpf_ktime_get_coarse_ns();
	nm.ext_addr = ext;
	nm.ext_port = rk.dport;
	nm.flags = (owned ? NAT_MAP_F_OWNS_PORT : 0) | (eif ? NAT_MAP_F_EIF : 0);
	nm.rule_id = r->rule_id;
	/* Another CPU may have made this endpoint's mapping meanwhile (its first two flows at once): this
	 * flow then keeps its port without a mapping, as after a collision. */
	if (nat_mappings.insert(&mk, &nm)) {
		if (owned)
			port_release(ext, rk.dport, orig->proto);
		host_port_give(orig->saddr);
		stat_count(STAT_CT_CREATE_RACE, 0);
	}
	return 0;
fail_full:
	*reason = STAT_DROP_TABLE_FULL;
fail:
	if (new_mapping)
		host_port_give(orig->saddr);
	return -1;
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
	struct nat_mapping *m = NULL;
	struct dnat_target *t;
	struct ct_key *owner;
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
	/* endpoint-independent filtering (RFC 4787 REQ-8): anyone may reach a live mapping's inside endpoint */
	ep.addr = rk->daddr;
	ep.port = rk->dport;
	ep.proto = rk->proto;
	owner = port_owner_live(&ep, &m);
	if (owner && m && (m->flags & NAT_MAP_F_EIF)) {
		*addr = owner->saddr;
		*port = owner->sport;
		*rule_id = m->rule_id;
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

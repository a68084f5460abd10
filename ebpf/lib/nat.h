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

	e.created_ns = bpf_ktime_get_ns();
	e.last_seen_ns = e.created_ns;
	e.nat_addr = ext;
	e.nat_port = rk->dport;
	e.state = state;
	e.flags = flags;
	e.rule_id = rule_id;
	err = ct_orig.insert(orig, &e);
	if (!err) {
		stat_count(STAT_CT_NEW, 0);
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
	__u32 range = (__u32)r->port_max - r->port_min + 1;
	__u16 want = bpf_ntohs(orig->sport);
	__u32 start, i;
	int err;

	/* RFC 4787 REQ-3a / RFC 5382: keep the inside port when it is free. */
	if (want >= r->port_min && want <= r->port_max && !port_forwarded(ext, orig->sport, orig->proto)) {
		rk.dport = orig->sport;
		err = ct_reply.insert(&rk, &rv);
		if (!err)
			goto claimed;
		if (err != -EEXIST)
			goto full;
	}
	start = bpf_get_prandom_u32();
	for (i = 0; i < NAT_PORT_TRIES; i++) {
		rk.dport = bpf_htons((__u16)(r->port_min + (start + i) % range));
		if (port_forwarded(ext, rk.dport, orig->proto))
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
	struct dnat_target *t;
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

#endif /* NATD_NAT_H */

/* SPDX-License-Identifier: GPL-2.0 */
/* IPv4 fragments (RFC 4787 REQ-14, RFC 5508): the first fragment holds the ports and is translated like
 * any packet; natd then remembers, for a few seconds, the address it gave that datagram, and translates
 * the later fragments (which carry no ports) the same way. A later fragment whose first natd has not
 * seen (reordered, or the first was lost) is never guessed at: dropped from the inside (passing it would
 * leak a private address), handed to the kernel from the internet (untranslated it is addressed to the
 * gateway itself). The table is an LRU map, so it is bounded without sweeping. */
#ifndef NATD_FRAG_H
#define NATD_FRAG_H

#include "maps.h"
#include "csum.h"

/* RFC 791's reassembly timer is 15 s; fragments of one datagram travel together, so a few seconds do. */
#define NATD_FRAG_TTL_NS (5ULL * 1000000000ULL)

static __always_inline void frag_key_of(const struct iphdr *ip, struct frag_key *k)
{
	k->saddr = ip->saddr;
	k->daddr = ip->daddr;
	k->id = ip->id;
	k->proto = ip->protocol;
	k->pad = 0;
}

/* After translating a first fragment: k was taken before the rewrite. */
static __always_inline void frag_remember(const struct frag_key *k, __be32 addr)
{
	struct frag_value v = { .seen_ns = bpf_ktime_get_ns(), .addr = addr };

	frag_map.update((struct frag_key *)k, &v);
}

/* The translated address for a later fragment, or 0 when its first fragment is unknown or too old. */
static __always_inline __be32 frag_lookup(const struct iphdr *ip)
{
	struct frag_key k;
	struct frag_value *v;

	frag_key_of(ip, &k);
	v = frag_map.lookup(&k);
	if (!v || bpf_ktime_get_ns() - v->seen_ns > NATD_FRAG_TTL_NS)
		return 0;
	return v->addr;
}

static __always_inline void frag_set_saddr(struct iphdr *ip, __be32 addr)
{
	nat_csum_replace4(&ip->check, ip->saddr, addr);
	ip->saddr = addr;
}

static __always_inline void frag_set_daddr(struct iphdr *ip, __be32 addr)
{
	nat_csum_replace4(&ip->check, ip->daddr, addr);
	ip->daddr = addr;
}

#endif /* NATD_FRAG_H */

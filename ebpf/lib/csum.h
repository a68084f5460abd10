/* SPDX-License-Identifier: GPL-2.0 */
/* Incremental checksum updates, RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m').
 * The tc-only bpf_l3/l4_csum_replace helpers do not exist in XDP, so this is done by hand. Values are
 * taken as they sit in the packet (network order): the one's complement sum is byte-order independent
 * (RFC 1071 2(B)) as long as the old and new values are read the same way. */
#ifndef NATD_CSUM_H
#define NATD_CSUM_H

static __always_inline __u16 nat_csum_fold(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

static __always_inline __u32 nat_csum_add(__u32 csum, __u32 addend)
{
	csum += addend;
	return csum + (csum < addend);
}

static __always_inline void nat_csum_replace4(__u16 *sum, __u32 from, __u32 to)
{
	__u32 c = (__u16)~*sum;

	c = nat_csum_add(c, ~from);
	c = nat_csum_add(c, to);
	*sum = nat_csum_fold(c);
}

static __always_inline void nat_csum_replace2(__u16 *sum, __u16 from, __u16 to)
{
	__u32 c = (__u16)~*sum;

	c = nat_csum_add(c, (__u16)~from);
	c = nat_csum_add(c, to);
	*sum = nat_csum_fold(c);
}

/* TTL sits in the high byte of the 16-bit word it shares with the protocol. */
static __always_inline void ip_decrease_ttl(struct iphdr *ip)
{
	__u16 old = *(__u16 *)&ip->ttl;

	ip->ttl--;
	nat_csum_replace2(&ip->check, old, *(__u16 *)&ip->ttl);
}

#endif /* NATD_CSUM_H */

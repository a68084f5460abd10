/* SPDX-License-Identifier: GPL-2.0 */
/* ICMP error translation (RFC 5508 REQ-3/4/5, RFC 5382 REQ-9): Destination Unreachable (incl.
 * Fragmentation Needed), Time Exceeded and Parameter Problem quote the packet they are about. For a
 * mapped flow, the outer address and the quoted header (address, port or echo identifier, and the
 * quoted IP and L4 checksums) are translated, and the ICMP checksum follows every change. Errors never
 * refresh or delete a conntrack entry; errors about no mapping are dropped (never leaked untranslated).
 * Hairpinned errors (RFC 5508 REQ-7) combine both halves here: see hairpin.h.
 * This is what makes traceroute and PMTU discovery work through the NAT. */
#ifndef NATD_ICMP_ERROR_H
#define NATD_ICMP_ERROR_H

#include "parsing.h"
#include "csum.h"
#include "maps.h"
#include "stats.h"
#include "fib.h"

static __always_inline int icmp_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/* RFC 5508 REQ-3 (SHOULD): an error whose ICMP checksum does not verify is dropped rather than translated.
 * The one's complement sum runs over the ICMP message up to the end of the IP datagram, 4 bytes at a time
 * (RFC 1071: the sum does not depend on the word size or byte order as long as it folds back to 16 bits;
 * the 2- and 1-byte tail is read the same way, the odd byte padded with zero). The loop is bounded for
 * the verifier: a message longer than ICMP_CSUM_MAX_WORDS * 4 = 576 bytes, more than a router may send
 * (RFC 1812 §4.3.2.3 keeps the whole error within 576 bytes), is not checked (a longer bound costs
 * xdp_inside ~650 verifier instructions a byte, and it is near the verifier's limit):
 * its checksum is carried over incrementally as before, still wrong if it was. Only called for errors
 * natd is about to translate: the rest go to the kernel, which checks for itself, or are dropped. */
#define ICMP_CSUM_MAX_WORDS 144

static __always_inline int icmp_csum_bad(const struct hdr_cursor *c, const struct icmphdr *icmp)
{
	const void *p = icmp;
	__u64 sum = 0;
	__u16 tail = 0;
	int i;

	for (i = 0; i < ICMP_CSUM_MAX_WORDS; i++) {
		if (p + 4 > c->end || p + 4 > c->limit)
			break;
		sum += *(const __u32 *)p;
		p += 4;
	}
	if (i == ICMP_CSUM_MAX_WORDS && p + 1 <= c->end && p + 1 <= c->limit)
		return 0;
	if (p + 2 <= c->end && p + 2 <= c->limit) {
		sum += *(const __u16 *)p;
		p += 2;
	}
	if (p + 1 <= c->end && p + 1 <= c->limit) {
		*(__u8 *)&tail = *(const __u8 *)p;
		sum += tail;
	}
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return sum != 0xffff;
}

/* The quoted packet inside an ICMP error: its IP header (options included) and the first 8 bytes of L4. */
struct quoted_pkt {
	struct iphdr *ip;
	__u16 *sport;          /* quoted source port / echo identifier */
	__u16 *dport;          /* quoted destination port / echo identifier */
	__u16 *csum;           /* quoted L4 checksum; valid only when has_csum */
	__u8 has_csum;         /* TCP's checksum sits at byte 16: present only if the router quoted it */
	__u8 pseudo;
	__u8 udp;
};

/* 0 = parsed, -1 = malformed (truncated / not IPv4), 1 = nothing natd can translate. */
static __always_inline int parse_quoted(struct hdr_cursor *c, struct quoted_pkt *q, __u8 echo_type)
{
	struct iphdr *ip = c->pos;
	void *l4;

	if ((void *)(ip + 1) > c->end || (void *)(ip + 1) > c->limit)
		return -1;
	if (ip->version != 4 || ip->ihl < 5)
		return -1;
	/* a quoted non-first fragment has no ports to translate */
	if (ip->frag_off & bpf_htons(0x1fff))
		return 1;
	/* RFC 5508 REQ-3b: traverse the quoted header's options to reach its transport header. ihl is a
	 * 4-bit field, so this is a variable offset of at most 60 bytes, which the verifier bounds; the
	 * 8 bytes of L4 must then still lie within the quote. The options themselves are left as quoted:
	 * only the quoted header's checksum covers them, and it is updated incrementally. */
	l4 = (void *)ip + ip->ihl * 4;
	if (l4 + 8 > c->end || l4 + 8 > c->limit)
		return -1;
	q->ip = ip;
	q->has_csum = 0;
	q->pseudo = 1;
	q->udp = 0;
	if (ip->protocol == IPPROTO_TCP) {
		q->sport = l4;
		q->dport = l4 + 2;
		q->csum = l4 + 2;
		if (l4 + 18 <= c->end && l4 + 18 <= c->limit) {
			q->csum = l4 + 16;
			q->has_csum = 1;
		}
		return 0;
	}
	if (ip->protocol == IPPROTO_UDP) {
		q->sport = l4;
		q->dport = l4 + 2;
		q->csum = l4 + 6;
		q->has_csum = 1;
		q->udp = 1;
		return 0;
	}
	if (ip->protocol == IPPROTO_ICMP) {
		struct icmphdr *ic = l4;

		if (echo_type == 0xff || !icmp_is_query(ic->type, echo_type) || ic->code != 0)
			return 1;
		q->sport = &ic->un.echo.id;
		q->dport = &ic->un.echo.id;
		q->csum = &ic->checksum;
		q->has_csum = 1;
		q->pseudo = 0;
		return 0;
	}
	return 1;
}

/* Rewrites one endpoint of the quoted packet (its address *q_addr and port *q_port) to addr/port, keeping
 * the quoted L4, quoted IP and ICMP checksums right. The quoted L4 checksum's own change is folded into
 * the ICMP checksum like any other word. The outer header is the caller's (icmp_outer_set_addr). */
static __always_inline void icmp_quote_rewrite(struct icmphdr *icmp, struct quoted_pkt *q, __be32 *q_addr,
					       __u16 *q_port, __be32 addr, __be16 port)
{
	__u16 old;

	if (q->has_csum && !(q->udp && *q->csum == 0)) {
		old = *q->csum;
		if (q->pseudo)
			nat_csum_replace4(q->csum, *q_addr, addr);
		nat_csum_replace2(q->csum, *q_port, port);
		if (q->udp && *q->csum == 0)
			*q->csum = 0xffff;
		nat_csum_replace2(&icmp->checksum, old, *q->csum);
	}
	nat_csum_replace2(&icmp->checksum, *q_port, port);
	*q_port = port;
	old = q->ip->check;
	nat_csum_replace4(&q->ip->check, *q_addr, addr);
	nat_csum_replace2(&icmp->checksum, old, q->ip->check);
	nat_csum_replace4(&icmp->checksum, *q_addr, addr);
	*q_addr = addr;
}

/* An address of the outer header: only the IP header checksum covers it (ICMP has no pseudo-header). */
static __always_inline void icmp_outer_set_addr(struct iphdr *outer, __be32 *outer_addr, __be32 addr)
{
	nat_csum_replace4(&outer->check, *outer_addr, addr);
	*outer_addr = addr;
}

/* The flow an error from the inside is about: the quote is (remote -> inside endpoint) as the inside
 * received it, so its reversed tuple is the flow's original key. */
static __always_inline struct ct_entry *icmp_quote_inside_flow(const struct quoted_pkt *q)
{
	struct ct_key key = {};

	key.saddr = q->ip->daddr;
	key.daddr = q->ip->saddr;
	key.sport = *q->dport;
	key.dport = *q->sport;
	key.proto = q->ip->protocol;
	return ct_orig.lookup(&key);
}

/* The public source of an error from the inside about flow e (RFC 5508 REQ-5c). The flow's own inside
 * host speaks for the flow's external address. Another inside node (a router between the host and the
 * gateway) gets its own static 1:1 address if it has one (the Basic NAT case of REQ-5c), else the NAT's
 * public address that the remote already knows for this flow. */
static __always_inline __be32 icmp_error_source(const struct iphdr *ip, const struct quoted_pkt *q,
						const struct ct_entry *e)
{
	__be32 *static_ext;

	if (ip->saddr == q->ip->daddr)
		return e->nat_addr;
	static_ext = static_out.lookup((__be32 *)&ip->saddr);  /* BCC's lookup takes a non-const key */
	return static_ext ? *static_ext : e->nat_addr;
}

/* An error from the internet about a packet natd sent out: the quoted packet is (external -> remote),
 * so its reply key finds the flow; the error goes to the inside host, quoting what that host sent. */
static __always_inline int icmp_error_in(struct xdp_md *ctx, struct hdr_cursor *c, struct ethhdr *eth,
					 struct iphdr *ip, struct icmphdr *icmp, const struct ext_addr_info *ext)
{
	struct bpf_fib_lookup fib;
	struct ct_reply_value *rv;
	struct quoted_pkt q = {};
	struct ct_key rk = {};
	__u16 port;
	int rc;

	rc = parse_quoted(c, &q, ICMP_ECHO);
	if (rc < 0)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	if (rc > 0)
		return pass_to_owner(ctx, ip, STAT_PASS_ICMP_OTHER);
	rk.saddr = q.ip->daddr;
	rk.daddr = q.ip->saddr;
	rk.sport = q.ip->protocol == IPPROTO_ICMP ? 0 : *q.dport;
	rk.dport = *q.sport;
	rk.proto = q.ip->protocol;
	rv = q.ip->saddr == ip->daddr ? ct_reply.lookup(&rk) : NULL;
	if (!rv || !ct_orig.lookup(&rv->orig)) {
		/* about the gateway's own traffic (outside the NAT ports, or its own pings, whose identifiers
		 * can be anything): the kernel's business */
		port = bpf_ntohs(*q.sport);
		if (q.ip->protocol == IPPROTO_ICMP || port < ext->port_min || port > ext->port_max)
			return pass_to_owner(ctx, ip, STAT_PASS_ICMP_OTHER);
		return verdict(ctx, XDP_DROP, STAT_DROP_NO_MAPPING);
	}
	if (ip->ttl <= 1)
		return verdict(ctx, XDP_PASS, STAT_PASS_TTL);
	if (icmp_csum_bad(c, icmp))
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	icmp_quote_rewrite(icmp, &q, &q.ip->saddr, q.sport, rv->orig.saddr, rv->orig.sport);
	icmp_outer_set_addr(ip, &ip->daddr, rv->orig.saddr);
	stat_count(STAT_ICMP_ERROR_IN, ctx->data_end - ctx->data);
	rc = fib_lookup_v4(ctx, &fib, ip, ip->saddr, ip->daddr, bpf_ntohs(ip->tot_len));
	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		return count_action(ctx, fib_redirect(eth, ip, &fib));
	return verdict(ctx, XDP_PASS, rc == BPF_FIB_LKUP_RET_NO_NEIGH ? STAT_PASS_NO_NEIGH : STAT_PASS_FIB_OTHER);
}

/* An error from the inside about a packet that came in through the NAT: the quoted packet is (remote ->
 * inside host), so the original key finds the flow; the error leaves quoting what the remote sent
 * (RFC 5508 REQ-5a). The sender is the inside host itself or, REQ-5c, another inside node on the way to
 * it (a router sending Time Exceeded or Fragmentation Needed); either way the source becomes public
 * (icmp_error_source). fib is the lookup xdp_inside already made (outbound, SUCCESS or NO_NEIGH). */
static __always_inline int icmp_error_out(struct xdp_md *ctx, struct hdr_cursor *c, struct ethhdr *eth,
					  struct iphdr *ip, struct icmphdr *icmp, struct bpf_fib_lookup *fib,
					  int fib_rc)
{
	struct quoted_pkt q = {};
	struct ct_entry *e;
	__be32 src;
	int rc;

	/* quoted ICMP would be an echo the host received: natd maps no inbound echo, so none */
	rc = parse_quoted(c, &q, 0xff);
	if (rc < 0)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	if (rc > 0)
		return verdict(ctx, XDP_DROP, STAT_DROP_UNSUPPORTED);
	e = icmp_quote_inside_flow(&q);
	if (!e)
		return verdict(ctx, XDP_DROP, STAT_DROP_NO_MAPPING);
	/* A third party's error must go where errors go, to the quoted packet's source (RFC 792): natd does
	 * not lend its public address to an inside node for messages about a flow sent anywhere else. */
	if (ip->saddr != q.ip->daddr && ip->daddr != q.ip->saddr)
		return verdict(ctx, XDP_DROP, STAT_DROP_NO_MAPPING);
	if (icmp_csum_bad(c, icmp))
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	src = icmp_error_source(ip, &q, e);
	icmp_quote_rewrite(icmp, &q, &q.ip->daddr, q.dport, e->nat_addr, e->nat_port);
	icmp_outer_set_addr(ip, &ip->saddr, src);
	stat_count(STAT_ICMP_ERROR_OUT, ctx->data_end - ctx->data);
	if (fib_rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return verdict(ctx, XDP_PASS, STAT_PASS_NO_NEIGH);
	return count_action(ctx, fib_redirect(eth, ip, fib));
}

#endif /* NATD_ICMP_ERROR_H */

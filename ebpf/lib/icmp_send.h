/* SPDX-License-Identifier: GPL-2.0 */
/* ICMP errors natd originates itself: Destination Unreachable, code 13 "communication administratively
 * prohibited", to an inside host whose packet cannot get a NAT session (RFC 5508 REQ-8: no port left,
 * the host's max_ports_per_host reached, the table full). The packet is turned into the error in place
 * and sent back out of the interface it came in on, so the host's connect() or sendto() fails at once
 * instead of timing out. */
#ifndef NATD_ICMP_SEND_H
#define NATD_ICMP_SEND_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/icmp.h>
#include "maps.h"
#include "csum.h"
#include "stats.h"

#ifndef ICMP_PKT_FILTERED
#define ICMP_PKT_FILTERED 13
#endif
/* uapi since Linux 6.8: the FIB lookup also picks the source address the kernel would use. natd's own
 * definition, since BCC's bundled bpf.h may predate it. */
#define NATD_FIB_LOOKUP_SRC (1U << 4)
#define NATD_FIB_LOOKUP_SKIP_NEIGH (1U << 2)

/* RFC 792 asks for the IP header and the first 64 bits of the datagram: enough for the host's stack to
 * find the socket (addresses, protocol, ports or the echo identifier). */
#define ICMP_QUOTE_LEN (sizeof(struct iphdr) + 8)

struct icmp_unreach_frame {
	struct iphdr ip;
	struct icmphdr icmp;
	__u8 quote[ICMP_QUOTE_LEN];
} __attribute__((packed));
_Static_assert(sizeof(struct icmp_unreach_frame) == sizeof(((struct icmp_scratch *)0)->frame),
	       "icmp_scratch.frame in maps.h must hold one struct icmp_unreach_frame");

/* RFC 1812 §4.3.2.8: a router limits the ICMP it sends. Per CPU, no atomics. */
static __always_inline int icmp_rate_allow(void)
{
	__u32 zero = 0;
	struct icmp_rate *r = icmp_rate.lookup(&zero);
	__u64 now = bpf_ktime_get_coarse_ns();

	if (!r)
		return 0;
	if (now - r->window_start_ns >= NATD_ICMP_WINDOW_NS) {
		r->window_start_ns = now;
		r->sent = 0;
	}
	if (r->sent >= NATD_ICMP_BURST)
		return 0;
	r->sent++;
	return 1;
}

static __always_inline __u16 icmp_sum(void *buf, __u32 len_multiple_of_4)
{
	return nat_csum_fold((__u32)bpf_csum_diff(NULL, 0, buf, len_multiple_of_4, 0));
}

/* Drop the packet (counted under reason) and, where RFC 1812 §4.3.2.7 allows an ICMP error about it,
 * send the host Destination Unreachable code 13 instead of nothing. Callers have checked the frame is
 * Ethernet + IPv4 without options, from an inside host, and not an ICMP error itself. */
static __always_inline int icmp_refuse(struct xdp_md *ctx, __u32 reason)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct icmp_scratch *scratch = icmp_scratch.lookup(&zero);
	struct icmp_unreach_frame *f;
	struct bpf_fib_lookup *fib;
	unsigned char macs[2 * ETH_ALEN];
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	__u64 len = data_end - data;
	__u32 frame_len;
	int rc;

	stat_count(reason, len);
	if (data + sizeof(*eth) + ICMP_QUOTE_LEN > data_end || ip->ihl != 5)
		goto drop;
	/* never about a later fragment, nor to an address that is not one host's */
	if (ip->frag_off & bpf_htons(0x1fff))
		goto drop;
	if (ip->saddr == 0 || ip->saddr == 0xffffffff || (bpf_ntohl(ip->saddr) >> 28) == 0xe)
		goto drop;
	if (!scratch)
		goto drop;
	fib = &scratch->fib;
	f = (struct icmp_unreach_frame *)scratch->frame;
	__builtin_memset(scratch, 0, sizeof(*scratch));
	fib->family = AF_INET;
	fib->ifindex = ctx->ingress_ifindex;
	fib->ipv4_dst = ip->saddr;
	/* the address the gateway itself would answer the host from (its address towards the host) */
	rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), NATD_FIB_LOOKUP_SRC | NATD_FIB_LOOKUP_SKIP_NEIGH);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || !fib->ipv4_src)
		goto drop;
	if (!icmp_rate_allow()) {
		stat_count(STAT_ICMP_UNREACH_RATE_LIMITED, len);
		goto drop;
	}

	__builtin_memcpy(f->quote, ip, ICMP_QUOTE_LEN);
	__builtin_memcpy(macs, eth->h_source, ETH_ALEN);
	__builtin_memcpy(macs + ETH_ALEN, eth->h_dest, ETH_ALEN);
	f->ip.version = 4;
	f->ip.ihl = 5;
	f->ip.tos = 0xc0;  /* internetwork control, as the kernel's own ICMP errors */
	f->ip.tot_len = bpf_htons(sizeof(*f));
	f->ip.ttl = 64;
	f->ip.protocol = IPPROTO_ICMP;
	f->ip.saddr = fib->ipv4_src;
	f->ip.daddr = ip->saddr;
	f->ip.check = icmp_sum(&f->ip, sizeof(f->ip));
	f->icmp.type = ICMP_DEST_UNREACH;
	f->icmp.code = ICMP_PKT_FILTERED;
	f->icmp.checksum = icmp_sum(&f->icmp, sizeof(f->icmp) + sizeof(f->quote));

	/* grow the front by the new IP + ICMP headers, then cut the frame after the quote */
	if (bpf_xdp_adjust_head(ctx, -(int)(sizeof(f->ip) + sizeof(f->icmp))))
		goto drop;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	frame_len = sizeof(struct ethhdr) + sizeof(*f);
	if (data + frame_len > data_end)
		goto drop;
	eth = data;
	__builtin_memcpy(eth->h_dest, macs, ETH_ALEN);
	__builtin_memcpy(eth->h_source, macs + ETH_ALEN, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	__builtin_memcpy(data + sizeof(struct ethhdr), f, sizeof(*f));
	if (bpf_xdp_adjust_tail(ctx, (int)frame_len - (int)(data_end - data)))
		goto drop;
	stat_count(STAT_ICMP_UNREACH_SENT, frame_len);
	/* back where it came from; bpf_redirect rather than XDP_TX, which a veth only delivers when its peer
	 * runs an XDP program (natd only asks what every redirect needs) */
	return count_action(ctx, bpf_redirect(ctx->ingress_ifindex, 0));
drop:
	return count_action(ctx, XDP_DROP);
}

/* A packet from inside that got no flow: RFC 5508 REQ-8 answers the reasons where the NAT could not make
 * a session (resources, max_ports_per_host); the others (a spoofed source, a stray RST) are dropped
 * silently, since an error to a forged source would go to somebody else. */
static __always_inline int nat_refuse(struct xdp_md *ctx, __u32 reason)
{
	if (reason == STAT_DROP_PORT_EXHAUSTED || reason == STAT_DROP_TABLE_FULL ||
	    reason == STAT_DROP_HOST_PORT_LIMIT)
		return icmp_refuse(ctx, reason);
	return verdict(ctx, XDP_DROP, reason);
}

#endif /* NATD_ICMP_SEND_H */

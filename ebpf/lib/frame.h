/* SPDX-License-Identifier: GPL-2.0 */
/* What both entry points do first: an Ethernet frame carrying IPv4, or the verdict for anything else. */
#ifndef NATD_FRAME_H
#define NATD_FRAME_H

#include "parsing.h"
#include "stats.h"

#define FRAME_IPV4 (-1)

/* FRAME_IPV4 with *eth and *ip set, or the (counted) XDP verdict to return: truncated or bad headers
 * are dropped, anything that is not IPv4 (ARP, IPv6, VLAN tags) goes to the kernel untouched. */
static __always_inline int parse_frame(struct xdp_md *ctx, struct hdr_cursor *c, struct ethhdr **eth,
				       struct iphdr **ip)
{
	*eth = parse_ethhdr(c);
	if (!*eth)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	if ((*eth)->h_proto != bpf_htons(ETH_P_IP))
		return verdict(ctx, XDP_PASS, STAT_PASS_NOT_IPV4);
	*ip = parse_iphdr(c);
	if (!*ip)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	return FRAME_IPV4;
}

#endif /* NATD_FRAME_H */

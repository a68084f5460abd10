/* SPDX-License-Identifier: GPL-2.0 */
/* Forwarding in XDP: bpf_fib_lookup() gives the egress interface and both MACs; the frame is then
 * redirected, so translated packets never climb the kernel's forwarding path. */
#ifndef NATD_FIB_H
#define NATD_FIB_H

#include <linux/if_ether.h>
#include "csum.h"
#include "stats.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* tot_len = 0 skips the kernel's MTU check (used to learn the egress interface of a too-big packet). */
static __always_inline int fib_lookup_v4(struct xdp_md *ctx, struct bpf_fib_lookup *p, const struct iphdr *ip,
					 __be32 src, __be32 dst, __u16 tot_len)
{
	__builtin_memset(p, 0, sizeof(*p));
	p->family = AF_INET;
	p->tos = ip->tos;
	p->l4_protocol = ip->protocol;
	p->tot_len = tot_len;
	p->ipv4_src = src;
	p->ipv4_dst = dst;
	p->ifindex = ctx->ingress_ifindex;
	return bpf_fib_lookup(ctx, p, sizeof(*p), 0);
}

static __always_inline int fib_is_outside(__u32 ifindex)
{
	return outside_ifaces.lookup(&ifindex) != NULL;
}

/* Hand a packet for an external address to the kernel only when that address is the gateway's own:
 * a pool address merely routed to the gateway would be routed straight back out by the kernel, and
 * bounce between the gateway and its upstream until the TTL runs out. Off the fast path (only packets
 * natd does not translate get here). */
static __always_inline int pass_to_owner(struct xdp_md *ctx, const struct iphdr *ip, __u32 reason)
{
	struct bpf_fib_lookup p;

	if (fib_lookup_v4(ctx, &p, ip, ip->saddr, ip->daddr, 0) == BPF_FIB_LKUP_RET_NOT_FWDED)
		return verdict(ctx, XDP_PASS, reason);
	return verdict(ctx, XDP_DROP, STAT_DROP_NO_MAPPING);
}

/* Only after BPF_FIB_LKUP_RET_SUCCESS: p has both MACs and the egress ifindex. */
static __always_inline int fib_redirect(struct ethhdr *eth, struct iphdr *ip, const struct bpf_fib_lookup *p)
{
	ip_decrease_ttl(ip);
	__builtin_memcpy(eth->h_dest, p->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, p->smac, ETH_ALEN);
	return bpf_redirect(p->ifindex, 0);
}

#endif /* NATD_FIB_H */

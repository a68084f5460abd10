/* SPDX-License-Identifier: GPL-2.0 */
/* natd's XDP entry points: xdp_inside runs on interfaces facing the private subnets (SNAT out),
 * xdp_outside on the interface facing the internet (replies back in). Compiled by BCC at start-up with
 * -I ebpf/lib, -DNATD_PIN_DIR and -DNATD_CT_MAX. The helpers live in lib/, one concern per header.
 *
 * Safety rule for every path: a packet natd cannot translate is never forwarded half-translated. On
 * the inside, anything bound for the outside that cannot be translated is dropped and counted
 * (handing it to the kernel would forward it with a private source); anything else goes to the kernel.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>

#include "abi.h"
#include "maps.h"
#include "stats.h"
#include "parsing.h"
#include "frame.h"
#include "csum.h"
#include "fib.h"
#include "conntrack.h"
#include "events.h"
#include "nat.h"
#include "icmp_error.h"
#include "icmp_send.h"
#include "hairpin.h"
#include "frag.h"

int xdp_inside(struct xdp_md *ctx)
{
	struct hdr_cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	__u64 bytes = ctx->data_end - ctx->data;
	struct bpf_fib_lookup fib;
	struct ext_addr_info *ext;
	struct l4_fields f = {};
	struct frag_key fk = {};
	struct ct_entry *e;
	struct ct_key key = {};
	__be32 frag_addr;
	int first_frag;
	struct ethhdr *eth = NULL;
	struct iphdr *ip = NULL;
	__u32 reason = 0;
	int act, fib_rc, l4, outbound;
	int too_big = 0;

	act = parse_frame(ctx, &c, &eth, &ip);
	if (act != FRAME_IPV4)
		return act;
	/* TTL expiring here: the kernel answers with Time Exceeded to the inside host (traceroute). */
	if (ip->ttl <= 1)
		return verdict(ctx, XDP_PASS, STAT_PASS_TTL);
	ext = ext_addrs.lookup(&ip->daddr);
	if (ext)
		return nat_hairpin(ctx, &c, eth, ip, ext);

	fib_rc = fib_lookup_v4(ctx, &fib, ip, ip->saddr, ip->daddr, bpf_ntohs(ip->tot_len));
	if (fib_rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		/* With DF the kernel sends Fragmentation Needed to the inside host (PMTU discovery). */
		if (ip->frag_off & bpf_htons(0x4000))
			return verdict(ctx, XDP_PASS, STAT_PASS_FRAG_NEEDED);
		/* Without DF (RFC 4787 REQ-13a) it is translated below like any packet and then handed to the
		 * kernel, which fragments and forwards it (accept_local on the inside interfaces lets it take a
		 * packet whose source is the gateway's own address). The lookup without the MTU check gives
		 * the egress interface. */
		too_big = 1;
		fib_rc = fib_lookup_v4(ctx, &fib, ip, ip->saddr, ip->daddr, 0);
	}
	if (fib_rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return verdict(ctx, XDP_PASS, STAT_PASS_LOCAL);
	if (fib_rc != BPF_FIB_LKUP_RET_SUCCESS && fib_rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return verdict(ctx, XDP_PASS, STAT_PASS_FIB_OTHER);
	outbound = fib_is_outside(fib.ifindex);
	if (!outbound)
		return verdict(ctx, XDP_PASS, STAT_PASS_INSIDE_ROUTE);

	if (ip->ihl != 5)
		return verdict(ctx, XDP_DROP, STAT_DROP_UNSUPPORTED);
	if (ip_is_later_fragment(ip)) {
		frag_addr = frag_lookup(ip);
		if (!frag_addr)
			return verdict(ctx, XDP_DROP, STAT_DROP_FRAG_UNKNOWN);
		frag_set_saddr(ip, frag_addr);
		stat_count(STAT_FRAG_TRANSLATED, bytes);
		if (too_big)
			return verdict(ctx, XDP_PASS, STAT_PASS_FRAGMENT_OUT);
		if (fib_rc == BPF_FIB_LKUP_RET_NO_NEIGH)
			return verdict(ctx, XDP_PASS, STAT_PASS_NO_NEIGH);
		return count_action(ctx, fib_redirect(eth, ip, &fib));
	}
	first_frag = ip_is_fragment(ip);
	frag_key_of(ip, &fk);
	l4 = parse_l4_fields(&c, ip, &f, ICMP_ECHO);
	if (l4 < 0)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	if (l4 > 0) {
		if (f.icmp && icmp_is_error(f.icmp->type)) {
			/* ICMP errors should not exceed 576 bytes (RFC 1812 4.3.2.3), so one too big for the
			 * outside link is dropped: icmp_error_out() translates and forwards whole packets. */
			if (too_big)
				return verdict(ctx, XDP_DROP, STAT_DROP_FRAG_NEEDED_NO_DF);
			return icmp_error_out(ctx, &c, eth, ip, f.icmp, &fib, fib_rc);
		}
		return verdict(ctx, XDP_DROP, STAT_DROP_UNSUPPORTED);
	}

	key.saddr = ip->saddr;
	key.daddr = ip->daddr;
	key.sport = *f.sport;
	key.dport = ip->protocol == IPPROTO_ICMP ? 0 : *f.dport;
	key.proto = ip->protocol;
	if (nat_out_flow(&key, &f, &e, &reason) < 0)
		return nat_refuse(ctx, reason);
	ct_update(e, f.tcp, CT_DIR_ORIG, bytes);
	ct_track_inside_ack(e, f.tcp);
	snat_rewrite(ip, &f, e->nat_addr, e->nat_port);
	if (first_frag)
		frag_remember(&fk, e->nat_addr);
	stat_count(STAT_SNAT_OUT, bytes);

	/* Too big for the outside link, DF=0: translated already, the kernel fragments it (in order) and
	 * forwards the fragments (RFC 4787 REQ-13a). */
	if (too_big)
		return verdict(ctx, XDP_PASS, STAT_PASS_FRAGMENT_OUT);
	/* Unresolved next hop: the kernel forwards this (already translated) packet and resolves the
	 * neighbour for the next ones. */
	if (fib_rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return verdict(ctx, XDP_PASS, STAT_PASS_NO_NEIGH);
	return count_action(ctx, fib_redirect(eth, ip, &fib));
}

int xdp_outside(struct xdp_md *ctx)
{
	struct hdr_cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	__u64 bytes = ctx->data_end - ctx->data;
	struct bpf_fib_lookup fib;
	struct ext_addr_info *ext;
	struct ct_reply_value *rv = NULL;
	struct l4_fields f = {};
	struct frag_key fk = {};
	struct ct_key rk = {};
	struct ct_entry *e = NULL;
	struct ethhdr *eth = NULL;
	struct iphdr *ip = NULL;
	__u32 reason = 0;
	__be32 frag_addr;
	__u16 port;
	int act, fib_rc, l4, rc, first_frag;

	act = parse_frame(ctx, &c, &eth, &ip);
	if (act != FRAME_IPV4)
		return act;

	ext = ext_addrs.lookup(&ip->daddr);
	if (!ext) {
		/* The internet has no business addressing the private prefixes directly. */
		if (snat_rule_for(ip->daddr))
			return verdict(ctx, XDP_DROP, STAT_DROP_TO_PRIVATE);
		return verdict(ctx, XDP_PASS, STAT_PASS_LOCAL);
	}
	if (ip->ihl != 5)
		return pass_to_owner(ctx, ip, STAT_PASS_UNSUPPORTED);
	if (ip_is_later_fragment(ip)) {
		frag_addr = frag_lookup(ip);
		if (!frag_addr)
			return pass_to_owner(ctx, ip, STAT_PASS_FRAG_UNKNOWN);
		if (ip->ttl <= 1)
			return pass_to_owner(ctx, ip, STAT_PASS_TTL);
		frag_set_daddr(ip, frag_addr);
		stat_count(STAT_FRAG_TRANSLATED, bytes);
		goto forward;
	}
	first_frag = ip_is_fragment(ip);
	frag_key_of(ip, &fk);
	l4 = parse_l4_fields(&c, ip, &f, ICMP_ECHOREPLY);
	if (l4 < 0)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	if (l4 > 0) {
		if (f.icmp && icmp_is_error(f.icmp->type))
			return icmp_error_in(ctx, &c, eth, ip, f.icmp, ext);
		return pass_to_owner(ctx, ip, ip->protocol == IPPROTO_ICMP ? STAT_PASS_ICMP_OTHER : STAT_PASS_LOCAL);
	}

	rk.saddr = ip->saddr;
	rk.daddr = ip->daddr;
	rk.sport = ip->protocol == IPPROTO_ICMP ? 0 : *f.sport;
	rk.dport = *f.dport;
	rk.proto = ip->protocol;
	rc = nat_in_flow(&rk, &f, ip->ttl, &rv, &e, &reason);
	if (rc == NAT_IN_DROP)
		return verdict(ctx, XDP_DROP, reason);
	if (rc == NAT_IN_PASS)
		return verdict(ctx, XDP_PASS, reason);
	if (rc == NAT_IN_NO_MAPPING || !e || !rv) {
		/* Echo replies for the gateway's own pings carry any identifier: the kernel's. */
		port = bpf_ntohs(*f.dport);
		if (ip->protocol != IPPROTO_ICMP && port >= ext->port_min && port <= ext->port_max)
			return verdict(ctx, XDP_DROP, STAT_DROP_NO_MAPPING);
		return pass_to_owner(ctx, ip, STAT_PASS_LOCAL);
	}
	if (ip->ttl <= 1)
		return verdict(ctx, XDP_PASS, STAT_PASS_TTL);
	if (f.tcp && f.tcp->rst && !ct_rst_acceptable(e, f.tcp))
		return verdict(ctx, XDP_DROP, STAT_DROP_OUT_OF_WINDOW);

	ct_update(e, f.tcp, CT_DIR_REPLY, bytes);
	dnat_rewrite(ip, &f, rv->orig.saddr, rv->orig.sport);
	if (first_frag)
		frag_remember(&fk, rv->orig.saddr);
	stat_count(STAT_DNAT_IN, bytes);
forward:

	fib_rc = fib_lookup_v4(ctx, &fib, ip, ip->saddr, ip->daddr, bpf_ntohs(ip->tot_len));
	if (fib_rc == BPF_FIB_LKUP_RET_SUCCESS)
		return count_action(ctx, fib_redirect(eth, ip, &fib));
	/* Translated back already: whatever the kernel does with it now (resolve the neighbour, fragment,
	 * send Fragmentation Needed) concerns the inside host only. */
	return verdict(ctx, XDP_PASS, fib_rc == BPF_FIB_LKUP_RET_NO_NEIGH ? STAT_PASS_NO_NEIGH : STAT_PASS_FIB_OTHER);
}

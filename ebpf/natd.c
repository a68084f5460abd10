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
#include "csum.h"
#include "fib.h"
#include "conntrack.h"
#include "nat.h"
#include "icmp_error.h"

int xdp_inside(struct xdp_md *ctx)
{
	struct hdr_cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	__u64 bytes = ctx->data_end - ctx->data;
	struct bpf_fib_lookup fib;
	struct snat_rule static_rule = {};
	struct snat_rule *rule;
	__be32 *static_ext;
	struct l4_fields f = {};
	struct ct_entry *e;
	struct ct_key key = {};
	struct ethhdr *eth;
	struct iphdr *ip;
	__u32 reason = 0;
	int fib_rc, l4, outbound;
	__be32 ext;

	eth = parse_ethhdr(&c);
	if (!eth)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return verdict(ctx, XDP_PASS, STAT_PASS_NOT_IPV4);
	ip = parse_iphdr(&c);
	if (!ip)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	/* TTL expiring here: the kernel answers with Time Exceeded to the inside host (traceroute). */
	if (ip->ttl <= 1)
		return verdict(ctx, XDP_PASS, STAT_PASS_TTL);

	fib_rc = fib_lookup_v4(ctx, &fib, ip, ip->saddr, ip->daddr, bpf_ntohs(ip->tot_len));
	if (fib_rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		/* With DF the kernel sends Fragmentation Needed to the inside host (PMTU discovery). */
		if (ip->frag_off & bpf_htons(0x4000))
			return verdict(ctx, XDP_PASS, STAT_PASS_FRAG_NEEDED);
		/* Without DF the kernel would fragment and forward it untranslated: only allowed inside. */
		fib_rc = fib_lookup_v4(ctx, &fib, ip, ip->saddr, ip->daddr, 0);
		if ((fib_rc == BPF_FIB_LKUP_RET_SUCCESS || fib_rc == BPF_FIB_LKUP_RET_NO_NEIGH) &&
		    fib_is_outside(fib.ifindex))
			return verdict(ctx, XDP_DROP, STAT_DROP_FRAG_NEEDED_NO_DF);
		return verdict(ctx, XDP_PASS, STAT_PASS_INSIDE_ROUTE);
	}
	if (fib_rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return verdict(ctx, XDP_PASS, STAT_PASS_LOCAL);
	if (fib_rc != BPF_FIB_LKUP_RET_SUCCESS && fib_rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return verdict(ctx, XDP_PASS, STAT_PASS_FIB_OTHER);
	outbound = fib_is_outside(fib.ifindex);
	if (!outbound)
		return verdict(ctx, XDP_PASS, STAT_PASS_INSIDE_ROUTE);

	if (ip_is_fragment(ip) || ip->ihl != 5)
		return verdict(ctx, XDP_DROP, STAT_DROP_UNSUPPORTED);
	l4 = parse_l4_fields(&c, ip, &f, ICMP_ECHO);
	if (l4 < 0)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	if (l4 > 0) {
		if (f.icmp && icmp_is_error(f.icmp->type))
			return icmp_error_out(ctx, &c, eth, ip, f.icmp, &fib, fib_rc);
		return verdict(ctx, XDP_DROP, STAT_DROP_UNSUPPORTED);
	}

	key.saddr = ip->saddr;
	key.daddr = ip->daddr;
	key.sport = *f.sport;
	key.dport = ip->protocol == IPPROTO_ICMP ? 0 : *f.dport;
	key.proto = ip->protocol;

	e = ct_orig.lookup(&key);
	if (!e) {
		/* A RST for a flow natd does not know has nothing to close. */
		if (f.tcp && f.tcp->rst)
			return verdict(ctx, XDP_DROP, STAT_DROP_NO_MAPPING);
		static_ext = static_out.lookup(&ip->saddr);
		if (static_ext) {
			/* static 1:1 NAT keeps the port: a one-port "range" */
			static_rule.rule_id = NATD_RULE_STATIC;
			static_rule.port_min = bpf_ntohs(key.sport);
			static_rule.port_max = static_rule.port_min;
			rule = &static_rule;
			ext = *static_ext;
		} else {
			rule = snat_rule_for(ip->saddr);
			if (!rule)
				return verdict(ctx, XDP_DROP, STAT_DROP_SPOOFED_INSIDE);
			if (snat_pick_addr(rule, ip->saddr, &ext) < 0)
				return verdict(ctx, XDP_DROP, STAT_DROP_PORT_EXHAUSTED);
		}
		if (snat_create(&key, rule, ext, ct_initial_state(f.tcp), &reason) < 0)
			return verdict(ctx, XDP_DROP, reason);
		e = ct_orig.lookup(&key);
		if (!e)
			return verdict(ctx, XDP_DROP, STAT_DROP_TABLE_FULL);
	}
	ct_update(e, f.tcp, CT_DIR_ORIG, bytes);
	snat_rewrite(ip, &f, e->nat_addr, e->nat_port);
	stat_count(STAT_SNAT_OUT, bytes);

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
	struct ct_reply_value *rv;
	struct l4_fields f = {};
	struct ct_key rk = {};
	struct ct_entry *e;
	struct ethhdr *eth;
	struct iphdr *ip;
	__u32 rule_id, reason = 0;
	__be16 inside_port;
	__be32 inside;
	__u16 port;
	int fib_rc, l4;

	eth = parse_ethhdr(&c);
	if (!eth)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return verdict(ctx, XDP_PASS, STAT_PASS_NOT_IPV4);
	ip = parse_iphdr(&c);
	if (!ip)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);

	ext = ext_addrs.lookup(&ip->daddr);
	if (!ext) {
		/* The internet has no business addressing the private prefixes directly. */
		if (snat_rule_for(ip->daddr))
			return verdict(ctx, XDP_DROP, STAT_DROP_TO_PRIVATE);
		return verdict(ctx, XDP_PASS, STAT_PASS_LOCAL);
	}
	if (ip_is_fragment(ip) || ip->ihl != 5)
		return verdict(ctx, XDP_PASS, STAT_PASS_UNSUPPORTED);
	l4 = parse_l4_fields(&c, ip, &f, ICMP_ECHOREPLY);
	if (l4 < 0)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	if (l4 > 0) {
		if (f.icmp && icmp_is_error(f.icmp->type))
			return icmp_error_in(ctx, &c, eth, ip, f.icmp, ext);
		return verdict(ctx, XDP_PASS, ip->protocol == IPPROTO_ICMP ? STAT_PASS_ICMP_OTHER : STAT_PASS_LOCAL);
	}

	rk.saddr = ip->saddr;
	rk.daddr = ip->daddr;
	rk.sport = ip->protocol == IPPROTO_ICMP ? 0 : *f.sport;
	rk.dport = *f.dport;
	rk.proto = ip->protocol;
	rv = ct_reply.lookup(&rk);
	e = rv ? ct_orig.lookup(&rv->orig) : NULL;
	/* A new flow from the internet: only through a port forward or a static mapping, and for TCP only
	 * with a SYN (a stray segment must not open state). */
	if (!e && inbound_target(&rk, &inside, &inside_port, &rule_id) == 0) {
		if (f.tcp && !(f.tcp->syn && !f.tcp->ack))
			return verdict(ctx, XDP_DROP, STAT_DROP_NO_MAPPING);
		if (inbound_create(&rk, inside, inside_port, ct_initial_state(f.tcp), rule_id, &reason) < 0)
			return verdict(ctx, XDP_DROP, reason);
		rv = ct_reply.lookup(&rk);
		e = rv ? ct_orig.lookup(&rv->orig) : NULL;
		if (!e)
			return verdict(ctx, XDP_DROP, STAT_DROP_NO_MAPPING);
	}
	if (!e) {
		/* Echo replies for the gateway's own pings carry any identifier: the kernel's. */
		port = bpf_ntohs(*f.dport);
		if (ip->protocol != IPPROTO_ICMP && port >= ext->port_min && port <= ext->port_max)
			return verdict(ctx, XDP_DROP, STAT_DROP_NO_MAPPING);
		return verdict(ctx, XDP_PASS, STAT_PASS_LOCAL);
	}
	if (ip->ttl <= 1)
		return verdict(ctx, XDP_PASS, STAT_PASS_TTL);

	ct_update(e, f.tcp, CT_DIR_REPLY, bytes);
	dnat_rewrite(ip, &f, rv->orig.saddr, rv->orig.sport);
	stat_count(STAT_DNAT_IN, bytes);

	fib_rc = fib_lookup_v4(ctx, &fib, ip, ip->saddr, ip->daddr, bpf_ntohs(ip->tot_len));
	if (fib_rc == BPF_FIB_LKUP_RET_SUCCESS)
		return count_action(ctx, fib_redirect(eth, ip, &fib));
	/* Translated back already: whatever the kernel does with it now (resolve the neighbour, fragment,
	 * send Fragmentation Needed) concerns the inside host only. */
	return verdict(ctx, XDP_PASS, fib_rc == BPF_FIB_LKUP_RET_NO_NEIGH ? STAT_PASS_NO_NEIGH : STAT_PASS_FIB_OTHER);
}

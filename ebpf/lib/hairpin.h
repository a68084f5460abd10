/* SPDX-License-Identifier: GPL-2.0 */
/* Hairpinning (RFC 4787 REQ-9, RFC 5382 REQ-8): an inside host talking to an external address of this
 * NAT (a port forward, a static mapping, another inside host's mapping). The packet goes through both
 * halves in one pass: out through the sender's own flow (its source becomes its external endpoint),
 * then in through the flow that external endpoint reaches, so the target sees the sender's external
 * address and port, exactly as if the packet had come from the internet. */
#ifndef NATD_HAIRPIN_H
#define NATD_HAIRPIN_H

#include "parsing.h"
#include "nat.h"
#include "fib.h"
#include "stats.h"

static __always_inline int nat_hairpin(struct xdp_md *ctx, struct hdr_cursor *c, struct ethhdr *eth,
				       struct iphdr *ip, const struct ext_addr_info *ext)
{
	__u64 bytes = ctx->data_end - ctx->data;
	struct ct_reply_value *rv = NULL;
	struct ct_entry *out = NULL, *in = NULL;
	struct bpf_fib_lookup fib;
	struct l4_fields f = {};
	struct ct_key key = {}, rk = {};
	__be16 inside_port;
	__be32 inside;
	__u32 rule_id, reason = 0;
	struct ct_key back = {};
	__u16 port;
	int fresh, rc;

	if (ip_is_fragment(ip) || ip->ihl != 5)
		return verdict(ctx, XDP_DROP, STAT_DROP_UNSUPPORTED);
	rc = parse_l4_fields(c, ip, &f, ICMP_ECHO);
	if (rc < 0)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	/* pings and anything else for the external address itself: the gateway answers, if the address is
	 * its own (else the kernel would forward it out with a private source) */
	if (rc > 0 || ip->protocol == IPPROTO_ICMP)
		return pass_to_owner(ctx, ip, STAT_PASS_LOCAL);
	key.saddr = ip->saddr;
	key.daddr = ip->daddr;
	key.sport = *f.sport;
	key.dport = *f.dport;
	key.proto = ip->protocol;
	/* Only NAT business goes round: a forward or static target, or a port in the NAT range (someone's
	 * mapping). Anything else is the gateway's own service, reached by its external address. */
	port = bpf_ntohs(*f.dport);
	rk.daddr = ip->daddr;
	rk.dport = *f.dport;
	rk.proto = ip->protocol;
	if ((port < ext->port_min || port > ext->port_max) &&
	    inbound_target(&rk, &inside, &inside_port, &rule_id) != 0 && !ct_orig.lookup(&key))
		return pass_to_owner(ctx, ip, STAT_PASS_LOCAL);

	fresh = !ct_orig.lookup(&key);
	if (nat_out_flow(&key, &f, &out, &reason) < 0)
		return verdict(ctx, XDP_DROP, reason);
	rk.saddr = out->nat_addr;
	rk.sport = out->nat_port;
	rc = nat_in_flow(&rk, &f, ip->ttl, &rv, &in, &reason);
	if (rc != NAT_IN_FOUND || !in || !rv) {
		/* Nobody behind that external endpoint (yet). A UDP mapping stays, as for any datagram to an
		 * unresponsive destination: it is what lets a peer behind this NAT answer (hairpinned hole
		 * punching, RFC 4787 REQ-9). A TCP segment that goes nowhere must not leave a flow behind. */
		if (fresh && f.tcp) {
			ct_key_reply(&key, out, &back);
			ct_reply.delete(&back);
			ct_orig.delete(&key);
		}
		return verdict(ctx, XDP_DROP, rc == NAT_IN_DROP ? reason : STAT_DROP_NO_MAPPING);
	}

	ct_update(out, f.tcp, CT_DIR_ORIG, bytes);
	ct_track_inside_ack(out, f.tcp);
	ct_update(in, f.tcp, CT_DIR_REPLY, bytes);
	snat_rewrite(ip, &f, out->nat_addr, out->nat_port);
	dnat_rewrite(ip, &f, rv->orig.saddr, rv->orig.sport);
	stat_count(STAT_HAIRPIN, bytes);

	rc = fib_lookup_v4(ctx, &fib, ip, ip->saddr, ip->daddr, bpf_ntohs(ip->tot_len));
	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		return count_action(ctx, fib_redirect(eth, ip, &fib));
	return verdict(ctx, XDP_PASS, rc == BPF_FIB_LKUP_RET_NO_NEIGH ? STAT_PASS_NO_NEIGH : STAT_PASS_FIB_OTHER);
}

#endif /* NATD_HAIRPIN_H */

/* SPDX-License-Identifier: GPL-2.0 */
/* Hairpinning (RFC 4787 REQ-9, RFC 5382 REQ-8): an inside host talking to an external address of this
 * NAT (a port forward, a static mapping, another inside host's mapping). The packet goes through both
 * halves in one pass: out through the sender's own flow (its source becomes its external endpoint),
 * then in through the flow that external endpoint reaches, so the target sees the sender's external
 * address and port, exactly as if the packet had come from the internet. ICMP (RFC 5508 REQ-7, RFC 7857
 * §12): echo to a static 1:1 address, its reply, and errors about hairpinned packets. */
#ifndef NATD_HAIRPIN_H
#define NATD_HAIRPIN_H

#include "parsing.h"
#include "nat.h"
#include "fib.h"
#include "stats.h"
#include "icmp_error.h"
#include "icmp_send.h"

/* A hairpinned packet, translated both ways, goes back in towards its target. */
static __always_inline int hairpin_forward(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip)
{
	struct bpf_fib_lookup fib;
	int rc;

	rc = fib_lookup_v4(ctx, &fib, ip, ip->saddr, ip->daddr, bpf_ntohs(ip->tot_len));
	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		return count_action(ctx, fib_redirect(eth, ip, &fib));
	return verdict(ctx, XDP_PASS, rc == BPF_FIB_LKUP_RET_NO_NEIGH ? STAT_PASS_NO_NEIGH : STAT_PASS_FIB_OTHER);
}

/* RFC 5508 REQ-7, RFC 7857 §12: a hairpinned echo request to a static 1:1 address (the Basic NAT part of
 * natd, the only inside host an echo can be addressed to by an external address). Out through the
 * sender's own echo session, as towards any remote, so the target sees the sender's external address and
 * mapped identifier; in to the static host by address alone (static NAT keeps identifiers, so no state
 * is needed on that side). An echo to any other external address is for the gateway itself, which
 * answers it if the address is its own. Timestamp requests (icmp_is_query) take the same way. */
static __always_inline int hairpin_echo(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
					struct l4_fields *f)
{
	__u64 bytes = ctx->data_end - ctx->data;
	struct ct_key key = {};
	struct ct_entry *out;
	__be32 *static_in_addr;
	__u32 reason = 0;
	__be32 target;

	static_in_addr = static_in.lookup(&ip->daddr);
	if (!static_in_addr)
		return pass_to_owner(ctx, ip, STAT_PASS_LOCAL);
	target = *static_in_addr;
	key.saddr = ip->saddr;
	key.daddr = ip->daddr;
	key.sport = *f->sport;
	key.proto = IPPROTO_ICMP;
	if (nat_out_flow(&key, f, &out, &reason) < 0)
		return nat_refuse(ctx, reason);
	ct_update(out, NULL, CT_DIR_ORIG, bytes);
	snat_rewrite(ip, f, out->nat_addr, out->nat_port);
	icmp_outer_set_addr(ip, &ip->daddr, target);
	stat_count(STAT_HAIRPIN, bytes);
	return hairpin_forward(ctx, eth, ip);
}

/* The static host's echo reply to a hairpinned echo: it is addressed to the sender's external address and
 * identifier, and leaves the static host as any of its packets do (its static address, identifier kept);
 * the sender's session, looked up from there as for a reply from the internet, takes it back to the
 * sender. Anything else (the gateway's own pings from an external address) is the kernel's. */
static __always_inline int hairpin_echo_reply(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
					      struct icmphdr *icmp)
{
	__u64 bytes = ctx->data_end - ctx->data;
	struct ct_reply_value *rv;
	__be32 *static_out_addr;
	struct ct_key rk = {};
	struct ct_entry *e;
	__be32 self;

	static_out_addr = static_out.lookup(&ip->saddr);
	if (!static_out_addr)
		return pass_to_owner(ctx, ip, STAT_PASS_LOCAL);
	self = *static_out_addr;
	rk.saddr = self;
	rk.daddr = ip->daddr;
	rk.dport = icmp->un.echo.id;
	rk.proto = IPPROTO_ICMP;
	rv = ct_reply.lookup(&rk);
	e = rv ? ct_orig.lookup(&rv->orig) : NULL;
	if (!rv || !e)
		return pass_to_owner(ctx, ip, STAT_PASS_LOCAL);
	ct_update(e, NULL, CT_DIR_REPLY, bytes);
	icmp_outer_set_addr(ip, &ip->saddr, self);
	nat_csum_replace2(&icmp->checksum, icmp->un.echo.id, rv->orig.sport);
	icmp->un.echo.id = rv->orig.sport;
	icmp_outer_set_addr(ip, &ip->daddr, rv->orig.saddr);
	stat_count(STAT_HAIRPIN, bytes);
	return hairpin_forward(ctx, eth, ip);
}

/* RFC 5508 REQ-7/REQ-7a: an error from the inside about a hairpinned packet, addressed to the sender's
 * external address. Both halves of icmp_error.h in one pass, as nat_hairpin does for the packet itself:
 * the quote, (sender's external endpoint -> target) as the target got it, is first translated out
 * through the target's flow (its destination becomes the external endpoint the sender used; the error's
 * source becomes public, REQ-5c), then in through the sender's flow (its source reverts to the sender's
 * inside endpoint, which is also the new outer destination, REQ-7a). Everything is looked up before
 * anything is rewritten; errors that are about no hairpinned flow stay the kernel's, as before. */
static __always_inline int hairpin_icmp_error(struct xdp_md *ctx, struct hdr_cursor *c, struct ethhdr *eth,
					      struct iphdr *ip, struct icmphdr *icmp)
{
	struct ct_reply_value *rv;
	struct quoted_pkt q = {};
	struct ct_entry *target, *sender;
	struct ct_key rk = {};
	__be32 src;
	int rc;

	/* natd maps no inbound echo, so no quoted echo is about a target's flow */
	rc = parse_quoted(c, &q, 0xff);
	if (rc < 0)
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	if (rc > 0 || q.ip->saddr != ip->daddr)
		return pass_to_owner(ctx, ip, STAT_PASS_LOCAL);
	target = icmp_quote_inside_flow(&q);
	if (!target)
		return pass_to_owner(ctx, ip, STAT_PASS_LOCAL);
	rk.saddr = target->nat_addr;
	rk.daddr = q.ip->saddr;
	rk.sport = target->nat_port;
	rk.dport = *q.sport;
	rk.proto = q.ip->protocol;
	rv = ct_reply.lookup(&rk);
	sender = rv ? ct_orig.lookup(&rv->orig) : NULL;
	if (!rv || !sender)
		return pass_to_owner(ctx, ip, STAT_PASS_LOCAL);
	if (icmp_csum_bad(c, icmp))
		return verdict(ctx, XDP_DROP, STAT_DROP_MALFORMED);
	src = icmp_error_source(ip, &q, target);
	icmp_quote_rewrite(icmp, &q, &q.ip->daddr, q.dport, target->nat_addr, target->nat_port);
	icmp_quote_rewrite(icmp, &q, &q.ip->saddr, q.sport, rv->orig.saddr, rv->orig.sport);
	icmp_outer_set_addr(ip, &ip->saddr, src);
	icmp_outer_set_addr(ip, &ip->daddr, rv->orig.saddr);
	stat_count(STAT_HAIRPIN, ctx->data_end - ctx->data);
	return hairpin_forward(ctx, eth, ip);
}

static __always_inline int nat_hairpin(struct xdp_md *ctx, struct hdr_cursor *c, struct ethhdr *eth,
				       struct iphdr *ip, const struct ext_addr_info *ext)
{
	__u64 bytes = ctx->data_end - ctx->data;
	struct ct_reply_value *rv = NULL;
	struct ct_entry *out = NULL, *in = NULL;
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
	if (f.icmp) {
		if (rc == 0)
			return hairpin_echo(ctx, eth, ip, &f);
		if (icmp_is_query(f.icmp->type, ICMP_ECHOREPLY) && f.icmp->code == 0)
			return hairpin_echo_reply(ctx, eth, ip, f.icmp);
		if (icmp_is_error(f.icmp->type))
			return hairpin_icmp_error(ctx, c, eth, ip, f.icmp);
	}
	/* anything else for the external address itself: the gateway answers, if the address is its own
	 * (else the kernel would forward it out with a private source) */
	if (rc > 0)
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
		return nat_refuse(ctx, reason);
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
	return hairpin_forward(ctx, eth, ip);
}

#endif /* NATD_HAIRPIN_H */

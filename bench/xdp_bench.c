/* SPDX-License-Identifier: GPL-2.0 */
/* The benchmarks' own XDP programs, compiled by BCC in bench/run.py with the lab's interface indexes
 * and MACs as constants (-D): no maps on the forwarding paths.
 *
 *   bare_in / bare_out  the "physical limit": no parsing beyond Ethernet, no maps. Rewrite both MACs to
 *                       fixed values and redirect to the other gateway interface.
 *   sink                on the server: counts and drops the generator's UDP (ports 9000-9999), passes the
 *                       rest (ping-pong, TCP) to the stack.
 *   parse_only          natd's own parsing helpers (ebpf/lib/parsing.h: Ethernet, IPv4 with IHL and total
 *                       length checks, TCP/UDP/ICMP fields) and nothing else: the yardstick of the fast path.
 *   xdp_pass            returns XDP_PASS.
 *   restore_call        BPF_PROG_TEST_RUN helper: repeat runs reuse one buffer that the program under
 *                       test rewrites (natd translates it), so this writes the pristine 60-byte frame from
 *                       `tmpl` back first (optionally a new port pair per run: a new flow each time), then
 *                       tail-calls the program in slot 0 of `jmp`. Its own cost is measured with xdp_pass
 *                       in the slot and subtracted.
 *   livegen             BPF_F_TEST_XDP_LIVE_FRAMES generator: writes the whole frame each time (live
 *                       frames recycle buffers), one of GEN_FLOWS source ports, and XDP_TX: out of the
 *                       client's veth into the gateway.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>

#include "parsing.h"

#define FRAME_LEN 60

struct frame_tmpl {
	__u8 b[FRAME_LEN];
	__u32 vary;  /* 1: a new (sport, dport) every run */
};

BPF_PERCPU_ARRAY(sink_count, __u64, 1);
BPF_ARRAY(tmpl, struct frame_tmpl, 2);   /* 0: restore_call's frame, 1: livegen's frame */
BPF_PERCPU_ARRAY(run_ctr, __u64, 1);
BPF_PROG_ARRAY(jmp, 1);

static __always_inline int redirect_fixed(struct xdp_md *ctx, const __u8 *dmac, const __u8 *smac, int ifindex)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	return bpf_redirect(ifindex, 0);
}

int bare_in(struct xdp_md *ctx)
{
	const __u8 dmac[ETH_ALEN] = { SRV_MAC };
	const __u8 smac[ETH_ALEN] = { OUT_MAC };

	return redirect_fixed(ctx, dmac, smac, OUT_IFINDEX);
}

int bare_out(struct xdp_md *ctx)
{
	const __u8 dmac[ETH_ALEN] = { CLI_MAC };
	const __u8 smac[ETH_ALEN] = { IN_MAC };

	return redirect_fixed(ctx, dmac, smac, IN_IFINDEX);
}

int sink(struct xdp_md *ctx)
{
	struct hdr_cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	struct ethhdr *eth = parse_ethhdr(&c);
	struct udphdr *udp;
	struct iphdr *ip;
	__u32 k = 0;
	__u64 *n;
	__u16 port;

	if (!eth || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	ip = parse_iphdr(&c);
	if (!ip || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	udp = parse_udphdr(&c);
	if (!udp)
		return XDP_PASS;
	port = bpf_ntohs(udp->dest);
	if (port < 9000 || port > 9999)
		return XDP_PASS;
	n = sink_count.lookup(&k);
	if (n)
		*n += 1;
	return XDP_DROP;
}

int parse_only(struct xdp_md *ctx)
{
	struct hdr_cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	struct l4_fields f = {};
	struct ethhdr *eth;
	struct iphdr *ip;

	eth = parse_ethhdr(&c);
	if (!eth)
		return XDP_DROP;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	ip = parse_iphdr(&c);
	if (!ip)
		return XDP_DROP;
	if (parse_l4_fields(&c, ip, &f, 8) < 0)
		return XDP_DROP;
	return XDP_PASS;
}

int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/* A UDP port at `off` (34: source, 36: destination) and the UDP checksum (offset 40) kept valid, RFC 1624.
 * The caller has checked that the 60-byte frame fits. */
static __always_inline void set_port(void *data, int off, __be16 port)
{
	__be16 *p = data + off, *sum = data + 40;
	__u32 c = (__u16)~*sum;

	c += (__u16)~*p;
	c += port;
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	*p = port;
	*sum = (__u16)~c ? (__u16)~c : 0xffff;
}

/* Writes template `slot` over the frame; with vary, a new port pair from the per-CPU run counter. */
static __always_inline int write_frame(struct xdp_md *ctx, __u32 slot)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct frame_tmpl *t = tmpl.lookup(&slot);
	__u32 k = 0;
	__u64 *ctr, i;

	if (!t || data + FRAME_LEN > end)
		return -1;
	__builtin_memcpy(data, t->b, FRAME_LEN);
	if (t->vary) {
		ctr = run_ctr.lookup(&k);
		if (!ctr)
			return -1;
		i = *ctr;
		*ctr = i + 1;
		if (t->vary == 1) {
			set_port(data, 34, bpf_htons((__u16)(2000 + i % 30000)));
			set_port(data, 36, bpf_htons((__u16)(9000 + (i / 30000) % 1000)));
		} else {
			set_port(data, 34, bpf_htons((__u16)(10000 + i % t->vary)));
		}
	}
	return 0;
}

int restore_call(struct xdp_md *ctx)
{
	if (write_frame(ctx, 0) < 0)
		return XDP_ABORTED;
	jmp.call(ctx, 0);
	return XDP_ABORTED;
}

int livegen(struct xdp_md *ctx)
{
	if (write_frame(ctx, 1) < 0)
		return XDP_ABORTED;
	return XDP_TX;
}

/* ---------------------------------------------------------------------------------------------------
 * Probes: parse_only plus one of the operations natd's fast path does per packet, to show where its time
 * goes (BPF_PROG_TEST_RUN on the inside frame, ingress gw:in0, in gw's namespace; each returns XDP_PASS
 * when the operation did what natd's would: FIB success, map hit).
 */
#include "abi.h"

struct probe_lpm_key {
	__u32 prefixlen;
	__be32 addr;
};

/* natd's own key and value (ebpf/lib/abi.h): the lookups cost what natd's cost */
#define probe_ct_key ct_key
#define probe_ct_val ct_entry

BPF_LPM_TRIE(probe_lpm, struct probe_lpm_key, __u32, 16);
BPF_HASH(probe_ct, struct probe_ct_key, struct probe_ct_val, 262144);
BPF_HASH(probe_ifaces, __u32, __u32, 64);
struct probe_stat {
	__u64 packets;
	__u64 bytes;
};

BPF_PERCPU_ARRAY(probe_stats, struct probe_stat, 64);

#define PROBE_PARSE                                                                                  \
	struct hdr_cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };  \
	struct l4_fields f = {};                                                                       \
	struct ethhdr *eth = parse_ethhdr(&c);                                                         \
	struct iphdr *ip;                                                                              \
	if (!eth || eth->h_proto != bpf_htons(ETH_P_IP))                                               \
		return XDP_DROP;                                                                       \
	ip = parse_iphdr(&c);                                                                          \
	if (!ip || parse_l4_fields(&c, ip, &f, 8) != 0)                                                \
		return XDP_DROP;

int probe_fib(struct xdp_md *ctx)
{
	struct bpf_fib_lookup p;

	PROBE_PARSE
	__builtin_memset(&p, 0, sizeof(p));
	p.family = 2;
	p.tos = ip->tos;
	p.l4_protocol = ip->protocol;
	p.tot_len = bpf_ntohs(ip->tot_len);
	p.ipv4_src = ip->saddr;
	p.ipv4_dst = ip->daddr;
	p.ifindex = ctx->ingress_ifindex;
	return bpf_fib_lookup(ctx, &p, sizeof(p), 0) == BPF_FIB_LKUP_RET_SUCCESS ? XDP_PASS : XDP_DROP;
}

int probe_lpm_lookup(struct xdp_md *ctx)
{
	PROBE_PARSE
	struct probe_lpm_key k = { .prefixlen = 32, .addr = ip->saddr };

	return probe_lpm.lookup(&k) ? XDP_PASS : XDP_DROP;
}

int probe_ct_lookup(struct xdp_md *ctx)
{
	PROBE_PARSE
	struct probe_ct_key k = {};

	k.saddr = ip->saddr;
	k.daddr = ip->daddr;
	k.sport = *f.sport;
	k.dport = *f.dport;
	k.proto = ip->protocol;
	return probe_ct.lookup(&k) ? XDP_PASS : XDP_DROP;
}

int probe_iface_lookup(struct xdp_md *ctx)
{
	PROBE_PARSE
	__u32 idx = ctx->ingress_ifindex;

	return probe_ifaces.lookup(&idx) ? XDP_PASS : XDP_DROP;
}

/* natd's ct_update for a UDP packet: ktime, two atomic adds, a flag test */
int probe_ct_update(struct xdp_md *ctx)
{
	PROBE_PARSE
	struct probe_ct_key k = {};
	struct probe_ct_val *v;

	k.saddr = ip->saddr;
	k.daddr = ip->daddr;
	k.sport = *f.sport;
	k.dport = *f.dport;
	k.proto = ip->protocol;
	v = probe_ct.lookup(&k);
	if (!v)
		return XDP_DROP;
	v->last_seen_ns = bpf_ktime_get_ns();
	__sync_fetch_and_add(&v->packets_orig, 1);
	__sync_fetch_and_add(&v->bytes_orig, 60);
	if (!(v->flags & CT_F_REPLIED))
		v->flags |= CT_F_REPLIED;
	return XDP_PASS;
}

int probe_ktime(struct xdp_md *ctx)
{
	PROBE_PARSE
	return bpf_ktime_get_ns() ? XDP_PASS : XDP_DROP;
}

/* natd counts a packet twice per verdict (reason + action) in a per-CPU array */
int probe_stats2(struct xdp_md *ctx)
{
	PROBE_PARSE
	__u32 a = 4, b = 20;
	struct probe_stat *x = probe_stats.lookup(&a), *y = probe_stats.lookup(&b);

	if (x) {
		x->packets++;
		x->bytes += 60;
	}
	if (y) {
		y->packets++;
		y->bytes += 60;
	}
	return XDP_PASS;
}

/* One hash insert with BPF_NOEXIST (natd claims a port and creates a flow with two of these), into a
 * preallocated 262144-entry map like natd's; run through restore_call with a new port pair each time. */
BPF_HASH(probe_ins, struct probe_ct_key, struct probe_ct_val, 262144);

int probe_ct_insert(struct xdp_md *ctx)
{
	PROBE_PARSE
	struct probe_ct_key k = {};
	struct probe_ct_val v = {};

	k.saddr = ip->saddr;
	k.daddr = ip->daddr;
	k.sport = *f.sport;
	k.dport = *f.dport;
	k.proto = ip->protocol;
	v.created_ns = 1;
	return probe_ins.insert(&k, &v) == 0 ? XDP_PASS : XDP_DROP;
}

/* SPDX-License-Identifier: GPL-2.0 */
/* Map declarations. Every map is pinned under NATD_PIN_DIR (<pin_root>/<instance>/v<layout>) so the
 * state outlives the daemon and natctl can read it. The loader passes NATD_PIN_DIR and NATD_CT_MAX. */
#ifndef NATD_MAPS_H
#define NATD_MAPS_H

#include "abi.h"

#ifndef NATD_PIN_DIR
#error "NATD_PIN_DIR must be defined by the loader"
#endif
#ifndef NATD_CT_MAX
#define NATD_CT_MAX 262144
#endif

/* The conntrack table: one entry per flow, keyed by the original (inside) tuple. Plain hash, not LRU:
 * a full table refuses new flows and never evicts established ones (RFC 6888 REQ-11). */
BPF_TABLE_PINNED("hash", struct ct_key, struct ct_entry, ct_orig, NATD_CT_MAX, NATD_PIN_DIR "/ct_orig");
/* Reply tuple -> original tuple. Its key is (remote, external addr/port, proto): inserting it with
 * BPF_NOEXIST is how an external port is claimed, unique per destination endpoint. */
BPF_TABLE_PINNED("hash", struct ct_key, struct ct_reply_value, ct_reply, NATD_CT_MAX,
		 NATD_PIN_DIR "/ct_reply");

BPF_TABLE_PINNED("lpm_trie", struct lpm_v4_key, struct snat_rule, snat_rules, NATD_MAX_RULES,
		 NATD_PIN_DIR "/snat_rules", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", __u32, __be32, snat_pool, NATD_MAX_POOL, NATD_PIN_DIR "/snat_pool");
BPF_TABLE_PINNED("hash", __be32, struct ext_addr_info, ext_addrs, NATD_MAX_POOL,
		 NATD_PIN_DIR "/ext_addrs");
/* Port forwards, and static 1:1 NAT both ways (inside -> outside for new outbound flows, outside ->
 * inside for new inbound ones). */
BPF_TABLE_PINNED("hash", struct dnat_key, struct dnat_target, dnat_rules, NATD_MAX_FORWARDS,
		 NATD_PIN_DIR "/dnat_rules");
BPF_TABLE_PINNED("hash", __be32, __be32, static_out, NATD_MAX_STATIC, NATD_PIN_DIR "/static_out");
BPF_TABLE_PINNED("hash", __be32, __be32, static_in, NATD_MAX_STATIC, NATD_PIN_DIR "/static_in");
/* NAT mappings (see struct nat_mapping), and which inside endpoint owns an external port: under
 * endpoint-independent mapping a new mapping claims its port here with BPF_NOEXIST, so the port goes to
 * one inside endpoint only (RFC 4787 REQ-1 cannot then be broken by another endpoint holding the same
 * port towards the same remote) and, under endpoint-independent filtering, identifies it (RFC 4787 §5).
 * Plain hashes: natd deletes a mapping and its port claim together when the mapping's last flow is gone. */
BPF_TABLE_PINNED("hash", struct ct_key, struct nat_mapping, nat_mappings, NATD_CT_MAX,
		 NATD_PIN_DIR "/nat_mappings");
BPF_TABLE_PINNED("hash", struct ext_endpoint, struct ct_key, port_owners, NATD_CT_MAX,
		 NATD_PIN_DIR "/port_owners");
/* Inside address -> external ports (mappings) it holds, for max_ports_per_host (RFC 6888 REQ-4). The
 * datapath adds, natd subtracts when it deletes mappings. */
BPF_TABLE_PINNED("hash", __be32, __u32, host_ports, NATD_MAX_HOSTS, NATD_PIN_DIR "/host_ports");
BPF_TABLE_PINNED("percpu_array", __u32, struct icmp_rate, icmp_rate, 1, NATD_PIN_DIR "/icmp_rate");
BPF_TABLE_PINNED("array", __u32, struct nat_secret, nat_secret, 1, NATD_PIN_DIR "/nat_secret");
/* Room to build an ICMP error in (ebpf/lib/icmp_send.h): XDP programs have 512 bytes of stack, and the
 * inside entry point's inlined paths use most of them. Not pinned: nothing lives in it between packets. */
struct icmp_scratch {
	struct bpf_fib_lookup fib;
	__u8 frame[56];           /* struct icmp_unreach_frame */
};
BPF_PERCPU_ARRAY(icmp_scratch, struct icmp_scratch, 1);
/* First fragments' translations, for the fragments that follow (LRU: bounded, never swept). */
BPF_TABLE_PINNED("lru_hash", struct frag_key, struct frag_value, frag_map, NATD_MAX_FRAGS,
		 NATD_PIN_DIR "/frag_map");
/* ifindex -> 1 for every outside interface: a FIB result through one of them means "leaves the NAT". */
BPF_TABLE_PINNED("hash", __u32, __u32, outside_ifaces, NATD_MAX_IFACES, NATD_PIN_DIR "/outside_ifaces");
BPF_TABLE_PINNED("percpu_array", __u32, struct stat_counter, stats, STAT_MAX, NATD_PIN_DIR "/stats");

/* NAT events for natd's event log and natctl -E (ebpf/lib/events.h writes, natd/events.py reads). BCC's
 * BPF_RINGBUF_OUTPUT cannot pin, so this is its declaration with a pinned section ("maps/<type>:<path>",
 * what BPF_TABLE_PINNED expands to); BCC then rewrites .ringbuf_reserve()/.ringbuf_submit() as usual.
 * Pinned, so events emitted while natd restarts wait in it for the next natd. */
#define NATD_RINGBUF_PINNED(_name, _bytes, _pinned)                 \
	struct _name##_table_t {                                    \
		int key;                                            \
		u32 leaf;                                           \
		int (*ringbuf_output)(void *, u64, u64);            \
		void *(*ringbuf_reserve)(u64);                      \
		void (*ringbuf_discard)(void *, u64);               \
		void (*ringbuf_submit)(void *, u64);                \
		u32 max_entries;                                    \
	};                                                          \
	__attribute__((section("maps/ringbuf:" _pinned)))          \
	struct _name##_table_t _name = { .max_entries = (_bytes) }
NATD_RINGBUF_PINNED(nat_events, NATD_EVENTS_RING_BYTES, NATD_PIN_DIR "/nat_events");
/* event_ctl[0]: the event types the datapath emits, a mask of 1 << enum nat_event_type. natd sets it while
 * something reads the events (an event log, natctl -E); 0, the initial value, costs the fast path one
 * array lookup per new flow and nothing else. */
BPF_TABLE_PINNED("array", __u32, __u32, event_ctl, 1, NATD_PIN_DIR "/event_ctl");

#endif /* NATD_MAPS_H */

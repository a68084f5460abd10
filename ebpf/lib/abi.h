/* SPDX-License-Identifier: GPL-2.0 */
/* The map layout shared by the datapath and the control plane.
 *
 * natd/maps.py mirrors every struct and enum here with ctypes; tests/unit/test_abi.py compiles this
 * header with the host compiler and checks sizes, offsets and enum values against the mirror.
 * Bump NATD_LAYOUT_VERSION on any change: it is part of the pin path, so a natd with another layout
 * never reads maps pinned by this one.
 */
#ifndef NATD_ABI_H
#define NATD_ABI_H

#include <linux/types.h>

#define NATD_LAYOUT_VERSION 6

#define NATD_MAX_POOL 256      /* external addresses over all rules */
#define NATD_MAX_RULES 1024    /* snat rules (LPM entries) */
#define NATD_MAX_IFACES 64
#define NATD_MAX_FORWARDS 4096 /* port forwards */
#define NATD_MAX_STATIC 1024   /* static 1:1 mappings */
#define NATD_EVENTS_RING_BYTES (1 << 20) /* nat_events ring buffer: ~26000 events of 40 bytes */
#define NATD_MAX_HOSTS 65536   /* inside addresses whose external ports are counted (host_ports) */

/* rule_id of flows not created by an snat rule */
#define NATD_RULE_STATIC 0xfffffffeu
#define NATD_RULE_FORWARD 0xffffffffu

/* A flow as one side sees it. The original key (dir "orig") is the inside host's view:
 * saddr/sport = private endpoint, daddr/dport = remote endpoint. The reply key is the internet's
 * view: saddr/sport = remote endpoint, daddr/dport = external address/port.
 * ICMP echo: sport (orig) / dport (reply) carry the identifier, the other port is 0. */
struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* TCP states, numbered as conntrack names them (nf_conntrack_tcp.h order is different;
 * natd's numbering is its own and mirrored in natd/maps.py). */
enum ct_state {
	CT_NONE = 0,            /* UDP, ICMP */
	CT_SYN_SENT = 1,
	CT_SYN_RECV = 2,
	CT_ESTABLISHED = 3,
	CT_FIN_WAIT = 4,
	CT_CLOSE_WAIT = 5,
	CT_LAST_ACK = 6,
	CT_TIME_WAIT = 7,
	CT_CLOSE = 8,
};

enum ct_flags {
	CT_F_REPLIED = 1 << 0,    /* a packet was seen in the reply direction */
	CT_F_ASSURED = 1 << 1,    /* TCP reached ESTABLISHED / UDP saw a reply */
	CT_F_FIN_ORIG = 1 << 2,   /* the initiator sent FIN */
	CT_F_FIN_REPLY = 1 << 3,  /* the responder sent FIN */
	CT_F_INBOUND = 1 << 4,    /* opened from the internet (port forward / static 1:1): the remote is the
				   * initiator, so "orig" counters and FIN_ORIG are the remote's */
};

/* Value of ct_orig: the conntrack entry. Packets and bytes "orig" are the initiator's (the inside host,
 * or the remote for CT_F_INBOUND flows), "reply" the responder's. Timestamps are
 * bpf_ktime_get_coarse_ns(): CLOCK_MONOTONIC at tick resolution, the clock of Python's
 * time.monotonic_ns() give or take a few ms. */
struct ct_entry {
	__u64 created_ns;
	__u64 last_seen_ns;
	__u64 packets_orig;
	__u64 bytes_orig;
	__u64 packets_reply;
	__u64 bytes_reply;
	__be32 nat_addr;          /* external address the flow is translated to */
	__be16 nat_port;          /* external port (ICMP: identifier) */
	__u8 state;               /* enum ct_state */
	__u8 flags;               /* enum ct_flags */
	__u32 rule_id;            /* snat rule that created it */
	__u32 inside_ack;         /* last TCP ACK number the inside host sent (host order; 0: none yet) */
};

/* Value of ct_reply: points back at the original key, so both halves share one entry. */
struct ct_reply_value {
	struct ct_key orig;
};

/* LPM key of snat_rules (prefixlen counts bits of addr). */
struct lpm_v4_key {
	__u32 prefixlen;
	__be32 addr;
};

/* NAT behaviour of a rule (RFC 4787 §4.1, §5). Defaults: endpoint-independent mapping (REQ-1) and
 * address-and-port-dependent filtering (the strict choice, what AWS NAT Gateway does). */
enum snat_rule_flags {
	SNAT_F_APDM = 1 << 0,     /* mapping: address-and-port-dependent (a fresh random port per flow) */
	SNAT_F_EIF = 1 << 1,      /* filtering: endpoint-independent ("full cone", for peer-to-peer) */
};

struct snat_rule {
	__u32 rule_id;
	__u32 pool_index;         /* first slot in snat_pool */
	__u32 pool_size;          /* slots used (>= 1) */
	__u16 port_min;           /* host byte order */
	__u16 port_max;
	__u32 flags;              /* enum snat_rule_flags */
	__u32 host_port_limit;    /* external ports (mappings) one inside address may hold; 0: no limit */
};

/* A NAT mapping (RFC 4787 §4.1): what an inside endpoint is translated to, whatever the remote.
 * Key: a struct ct_key with the inside endpoint (saddr, sport, proto) and, under endpoint-independent
 * mapping, daddr = dport = 0; under address-and-port-dependent mapping the whole original tuple (every
 * flow is its own mapping). The datapath creates a mapping with the first flow that needs it (after that
 * flow's two halves) and reuses it for every later flow of the endpoint; natd deletes it once the
 * endpoint has no flow left (natd/reaper.py), so a mapping lives exactly as long as its flows. */
enum nat_mapping_flags {
	NAT_MAP_F_OWNS_PORT = 1 << 0, /* its port is claimed in port_owners: no other endpoint shares it */
	NAT_MAP_F_EIF = 1 << 1,       /* created under endpoint-independent filtering */
};

struct nat_mapping {
	__u64 last_used_ns;       /* bpf_ktime_get_coarse_ns() when a flow last took it (created or reused) */
	__be32 ext_addr;
	__be16 ext_port;          /* ICMP: the external identifier */
	__u8 flags;               /* enum nat_mapping_flags */
	__u8 pad;
	__u32 rule_id;            /* snat rule that created it */
	__u32 pad2;
};

/* The key of the endpoint-independent mapping's port choice (eim_hash() in nat.h): natd writes random
 * bytes once (natd.tables.PinnedTables.ensure_nat_secret); pinned, so a restart keeps choosing the same
 * ports. RFC 7857 §9 / RFC 6056 §3.3.3: a port that cannot be the inside port should not be predictable
 * from the inside endpoint alone. */
struct nat_secret {
	__u32 key[4];
};

/* Rate limit of the ICMP errors natd sends itself (RFC 1812 §4.3.2.8), per CPU: at most
 * NATD_ICMP_BURST in each NATD_ICMP_WINDOW_NS window. */
#define NATD_ICMP_BURST 100
#define NATD_ICMP_WINDOW_NS 100000000ULL
struct icmp_rate {
	__u64 window_start_ns;
	__u32 sent;
	__u32 pad;
};

#define NATD_MAX_FRAGS 8192
/* Non-first fragments carry no ports: the first fragment's translation is remembered briefly, keyed
 * by what every fragment of a datagram shares (RFC 791: source, destination, protocol, identification),
 * as it arrived (before translation). */
struct frag_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8 proto;
	__u8 pad;
};

struct frag_value {
	__u64 seen_ns;            /* first fragment's time: entries older than NATD_FRAG_TTL_NS are ignored */
	__be32 addr;              /* the translated address: new source (outbound) or destination (inbound) */
	__u32 pad;
};

/* An external endpoint (key of port_owners). */
struct ext_endpoint {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* Value of ext_addrs, keyed by an external address: which ports of it belong to the NAT. Ports outside
 * this range are the gateway's own (ssh, its own connections) and go to the kernel untouched. */
struct ext_addr_info {
	__u16 port_min;
	__u16 port_max;
	__u32 pad;
};

/* Port forward (DNAT): external address/port/proto -> inside address/port. */
struct dnat_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct dnat_target {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

struct stat_counter {
	__u64 packets;
	__u64 bytes;
};

/* Every counted event: XDP verdicts, pass reasons, drop reasons, conntrack events. One place, so
 * natd/maps.py (STAT_NAMES) and the metrics name them the same. Keep STAT_MAX last. */
enum natd_stat {
	STAT_XDP_ABORTED = 0,     /* indexes 0..4 are the XDP verdicts by value */
	STAT_XDP_DROP,
	STAT_XDP_PASS,
	STAT_XDP_TX,
	STAT_XDP_REDIRECT,
	/* egress/ingress traffic translated */
	STAT_SNAT_OUT,            /* inside -> outside, translated */
	STAT_DNAT_IN,             /* outside -> inside reply, translated back */
	/* passed to the kernel, untouched */
	STAT_PASS_NOT_IPV4,
	STAT_PASS_LOCAL,          /* for the gateway itself or not NAT business */
	STAT_PASS_INSIDE_ROUTE,   /* inside -> inside, the kernel routes it */
	STAT_PASS_TTL,            /* TTL <= 1: the kernel sends Time Exceeded to the inside host */
	STAT_PASS_FRAG_NEEDED,    /* DF and too big: the kernel sends Fragmentation Needed */
	STAT_PASS_NO_NEIGH,       /* translated, but the next hop is unresolved: kernel forwards */
	STAT_PASS_FIB_OTHER,      /* no route/forwarding disabled: the kernel decides */
	STAT_PASS_ICMP_OTHER,     /* ICMP other than echo on the outside, for the gateway */
	STAT_PASS_UNSUPPORTED,    /* fragment / IP options on the outside: the kernel's to handle */
	/* dropped */
	STAT_DROP_MALFORMED,
	STAT_DROP_NO_MAPPING,     /* unsolicited inbound in the NAT port range */
	STAT_DROP_TO_PRIVATE,     /* arrived outside, addressed to an inside prefix */
	STAT_DROP_SPOOFED_INSIDE, /* inside source outside every snat prefix, bound for outside */
	STAT_DROP_UNSUPPORTED,    /* fragment / IP options / protocol natd cannot translate, bound outside */
	STAT_DROP_PORT_EXHAUSTED,
	STAT_DROP_TABLE_FULL,
	STAT_DROP_FRAG_NEEDED_NO_DF, /* an ICMP error from inside, too big for the outside link, no DF */
	STAT_DROP_OUT_OF_WINDOW,  /* a RST from the internet outside the inside host's window */
	/* conntrack events */
	STAT_CT_NEW,
	STAT_CT_ESTABLISHED,
	STAT_CT_CREATE_RACE,      /* another CPU created the same flow first */
	STAT_ICMP_ERROR_IN,       /* ICMP error for a mapped flow, translated to the inside host */
	STAT_ICMP_ERROR_OUT,      /* ICMP error from an inside host about a mapped flow, translated out */
	STAT_CT_NEW_INBOUND,      /* flows opened from the internet through a port forward or static NAT */
	STAT_HAIRPIN,             /* inside -> external address -> inside, translated both ways */
	STAT_EVENTS_LOST,         /* NAT events not queued: the nat_events ring buffer was full */
	STAT_FRAG_TRANSLATED,     /* a non-first fragment translated like its datagram's first fragment */
	STAT_DROP_FRAG_UNKNOWN,   /* a non-first fragment from inside whose first fragment natd never saw */
	STAT_PASS_FRAG_UNKNOWN,   /* the same from the internet: the kernel's (untranslated, it is local) */
	STAT_PASS_FRAGMENT_OUT,   /* translated, too big for the next link and DF=0: the kernel fragments it */
	STAT_DROP_HOST_PORT_LIMIT, /* the inside host holds its rule's max_ports_per_host (RFC 6888 REQ-4) */
	STAT_ICMP_UNREACH_SENT,   /* Destination Unreachable code 13 sent to an inside host (RFC 5508 REQ-8) */
	STAT_ICMP_UNREACH_RATE_LIMITED, /* the same, not sent: over the rate limit */
	STAT_EIM_PORT_SHARED,     /* a new mapping shares its port with another endpoint's (RFC 7857 §3) */
	STAT_EIM_COLLISION,       /* a mapping's port was taken towards this remote: the flow got another */
	STAT_MAX,
};

/* NAT events (RFC 6888 REQ-12 logging, natctl -E). The datapath emits NEW when it creates a flow
 * (ebpf/lib/events.h, into the nat_events ring buffer); natd emits DESTROY itself when a flow is deleted
 * (the reaper, natctl -D/-F). event_ctl[0] holds the types the datapath emits, as a mask of 1 << type. */
enum nat_event_type {
	NAT_EVENT_NEW = 1,
	NAT_EVENT_DESTROY = 2,
};

/* One record of nat_events. Addresses and ports in network byte order, like ct_key; for ICMP echo the
 * inside and external ports are the identifier and remote_port is 0. The tuple is the ct_orig key's
 * (inside -> remote) also for flows opened from the internet (flags has CT_F_INBOUND). */
struct nat_event {
	__u64 time_ns;            /* bpf_ktime_get_ns(): CLOCK_MONOTONIC, natd converts it to wall-clock */
	__u8 type;                /* enum nat_event_type */
	__u8 proto;
	__u8 flags;               /* enum ct_flags of the flow */
	__u8 pad;
	__be32 inside_addr;
	__be32 external_addr;
	__be32 remote_addr;
	__be16 inside_port;
	__be16 external_port;
	__be16 remote_port;
	__u16 pad2;
};

#endif /* NATD_ABI_H */

/* SPDX-License-Identifier: GPL-2.0 */
/* Connection tracking: per-flow state, counters and last-seen time in ct_orig. The daemon's reaper
 * expires entries from last_seen_ns and the state, with the timeouts of the config. */
#ifndef NATD_CONNTRACK_H
#define NATD_CONNTRACK_H

#include "maps.h"
#include "stats.h"

#define CT_DIR_ORIG 0
#define CT_DIR_REPLY 1

/* TCP state machine over both directions, with conntrack's state names (RFC 7857 §2, RFC 6146 §3.5.2).
 * Simultaneous open: a bare SYN from the remote while SYN_SENT also leads to SYN_RECV.
 * A RST closes the entry; the reaper then drops it after the short tcp_close timeout. */
/* dir here is logical: CT_DIR_ORIG = from the initiator, CT_DIR_REPLY = from the responder. */
static __always_inline void ct_tcp_update(struct ct_entry *e, const struct tcphdr *tcp, int dir)
{
	__u8 st = e->state;

	if (tcp->rst) {
		e->state = CT_CLOSE;
		return;
	}
	if (tcp->syn) {
		if (dir == CT_DIR_REPLY) {
			if (st == CT_SYN_SENT)
				e->state = CT_SYN_RECV;
		} else if (!tcp->ack && (st == CT_TIME_WAIT || st == CT_CLOSE)) {
			/* the inside host reuses the tuple for a new connection */
			e->state = CT_SYN_SENT;
			e->flags &= ~(CT_F_FIN_ORIG | CT_F_FIN_REPLY);
		}
		return;
	}
	if (tcp->fin) {
		e->flags |= dir == CT_DIR_REPLY ? CT_F_FIN_REPLY : CT_F_FIN_ORIG;
		if ((e->flags & (CT_F_FIN_ORIG | CT_F_FIN_REPLY)) == (CT_F_FIN_ORIG | CT_F_FIN_REPLY))
			e->state = CT_LAST_ACK;
		else
			e->state = dir == CT_DIR_REPLY ? CT_CLOSE_WAIT : CT_FIN_WAIT;
		return;
	}
	if (tcp->ack) {
		if (st == CT_SYN_RECV) {
			e->state = CT_ESTABLISHED;
			e->flags |= CT_F_ASSURED;
			stat_count(STAT_CT_ESTABLISHED, 0);
		} else if (st == CT_LAST_ACK) {
			e->state = CT_TIME_WAIT;
		}
	}
}

/* Account one packet of a flow. tcp is NULL for UDP and ICMP. dir is physical: CT_DIR_ORIG = from the
 * inside, CT_DIR_REPLY = from the internet; an inbound flow's initiator is the internet side. */
static __always_inline void ct_update(struct ct_entry *e, const struct tcphdr *tcp, int dir, __u64 bytes)
{
	if (e->flags & CT_F_INBOUND)
		dir = !dir;
	/* the coarse clock: CLOCK_MONOTONIC at tick resolution (a few ms, nothing next to a timeout),
	 * ~30 ns cheaper on every packet (bench/README.md) */
	e->last_seen_ns = bpf_ktime_get_coarse_ns();
	if (dir == CT_DIR_REPLY) {
		__sync_fetch_and_add(&e->packets_reply, 1);
		__sync_fetch_and_add(&e->bytes_reply, bytes);
		if (!(e->flags & CT_F_REPLIED))
			e->flags |= CT_F_REPLIED | (tcp ? 0 : CT_F_ASSURED);
	} else {
		__sync_fetch_and_add(&e->packets_orig, 1);
		__sync_fetch_and_add(&e->bytes_orig, bytes);
	}
	if (tcp)
		ct_tcp_update(e, tcp, dir);
}

/* Remember where the inside host's receive window starts (its last ACK), for ct_rst_acceptable(). */
static __always_inline void ct_track_inside_ack(struct ct_entry *e, const struct tcphdr *tcp)
{
	if (tcp && tcp->ack)
		e->inside_ack = bpf_ntohl(tcp->ack_seq);
}

/* RFC 5961 §3 in spirit (what conntrack's window tracking gives netfilter): a RST from the internet
 * counts only if its sequence number falls near what the inside host expects (its last ACK), else
 * anyone who guesses a 4-tuple could tear the mapping down. natd does not track the advertised window,
 * so it accepts 64 KiB behind and CT_RST_WINDOW ahead of that ACK. */
#define CT_RST_BEHIND (1u << 16)
#define CT_RST_WINDOW (1u << 20)
static __always_inline int ct_rst_acceptable(const struct ct_entry *e, const struct tcphdr *tcp)
{
	if (!e->inside_ack)
		return 1;
	return (__u32)(bpf_ntohl(tcp->seq) - e->inside_ack + CT_RST_BEHIND) < CT_RST_WINDOW + CT_RST_BEHIND;
}

/* The state a new flow starts in: only a SYN opens a TCP connection; a flow picked up mid-stream
 * (say, after the table was flushed) is taken as established, like conntrack's tcp_loose. */
static __always_inline __u8 ct_initial_state(const struct tcphdr *tcp)
{
	if (!tcp)
		return CT_NONE;
	if (tcp->syn && !tcp->ack)
		return CT_SYN_SENT;
	return CT_ESTABLISHED;
}

#endif /* NATD_CONNTRACK_H */

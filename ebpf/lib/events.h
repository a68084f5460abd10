/* SPDX-License-Identifier: GPL-2.0 */
/* NAT events: one record per new flow into the nat_events ring buffer, for natd's event log (RFC 6888
 * REQ-12) and natctl -E. natd emits DESTROY events itself, from the control plane (natd/events.py).
 *
 * The fast path never waits and never wakes anyone: a record is reserved and submitted with
 * BPF_RB_NO_WAKEUP (no irq_work, no wake-up of the reader per event); natd drains the ring on a short
 * timer instead (natd.events.POLL_INTERVAL_S), so the reader's wake-ups are batched by time whatever the
 * flow rate. A full ring loses the event, counted in STAT_EVENTS_LOST; the packet is translated as usual.
 * Nothing is emitted unless natd asked for it in event_ctl. */
#ifndef NATD_EVENTS_H
#define NATD_EVENTS_H

#include "maps.h"
#include "stats.h"

static __always_inline int nat_event_wanted(__u8 type)
{
	__u32 k = 0;
	__u32 *mask = event_ctl.lookup(&k);

	return mask && (*mask & (1u << type));
}

/* An event about the flow orig/e (the ct_orig key and entry, as just inserted). */
static __always_inline void nat_event_emit(__u8 type, const struct ct_key *orig, const struct ct_entry *e)
{
	struct nat_event *ev;

	if (!nat_event_wanted(type))
		return;
	ev = nat_events.ringbuf_reserve(sizeof(*ev));
	if (!ev) {
		stat_count(STAT_EVENTS_LOST, 0);
		return;
	}
	/* ring memory is not zeroed: every byte is written */
	ev->time_ns = e->created_ns;
	ev->type = type;
	ev->proto = orig->proto;
	ev->flags = e->flags;
	ev->pad = 0;
	ev->inside_addr = orig->saddr;
	ev->external_addr = e->nat_addr;
	ev->remote_addr = orig->daddr;
	ev->inside_port = orig->sport;
	ev->external_port = e->nat_port;
	ev->remote_port = orig->dport;
	ev->pad2 = 0;
	nat_events.ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
}

#endif /* NATD_EVENTS_H */

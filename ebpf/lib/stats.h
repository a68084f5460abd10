/* SPDX-License-Identifier: GPL-2.0 */
/* Counting verdicts and reasons. Per-CPU, so no atomics on the fast path; natd sums them at scrape. */
#ifndef NATD_STATS_H
#define NATD_STATS_H

#include "maps.h"

static __always_inline void stat_count(__u32 id, __u64 bytes)
{
	struct stat_counter *c = stats.lookup(&id);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

/* Count the XDP verdict alone (the reason was counted on the way) and return it. */
static __always_inline int count_action(struct xdp_md *ctx, int action)
{
	stat_count((__u32)action, ctx->data_end - ctx->data);
	return action;
}

/* Count a reason and the XDP verdict it leads to, and return the verdict. */
static __always_inline int verdict(struct xdp_md *ctx, int action, __u32 reason)
{
	__u64 len = ctx->data_end - ctx->data;

	stat_count(reason, len);
	stat_count((__u32)action, len);
	return action;
}

#endif /* NATD_STATS_H */

/* SPDX-License-Identifier: GPL-2.0 */
/* Bounds-checked header parsing with a cursor, in the style of xdp-tools' parsing_helpers.h.
 * Every parse_*() returns a pointer into the packet or NULL when the header does not fit: the
 * verifier needs each access proven against data_end, and so do we against truncated frames. */
#ifndef NATD_PARSING_H
#define NATD_PARSING_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>

/* end is data_end, the bound the verifier trusts; limit is where the IP datagram ends (total length),
 * which can be short of end when the frame carries Ethernet padding. A header must fit both. */
struct hdr_cursor {
	void *pos;
	void *end;
	void *limit;
	__u8 more_fragments;   /* a first fragment: L4 lengths cover the whole datagram, not this frame */
};

static __always_inline struct ethhdr *parse_ethhdr(struct hdr_cursor *c)
{
	struct ethhdr *eth = c->pos;

	c->limit = c->end;
	if ((void *)(eth + 1) > c->end)
		return NULL;
	c->pos = eth + 1;
	return eth;
}

/* The IPv4 header including options; checks IHL and total length against the frame. */
static __always_inline struct iphdr *parse_iphdr(struct hdr_cursor *c)
{
	struct iphdr *ip = c->pos;
	__u32 hdrlen;

	if ((void *)(ip + 1) > c->end)
		return NULL;
	if (ip->version != 4 || ip->ihl < 5)
		return NULL;
	hdrlen = ip->ihl * 4;
	if (c->pos + hdrlen > c->end)
		return NULL;
	if (bpf_ntohs(ip->tot_len) < hdrlen || c->pos + bpf_ntohs(ip->tot_len) > c->end)
		return NULL;
	c->limit = c->pos + bpf_ntohs(ip->tot_len);
	c->more_fragments = !!(ip->frag_off & bpf_htons(0x2000));
	c->pos += hdrlen;
	return ip;
}

static __always_inline struct tcphdr *parse_tcphdr(struct hdr_cursor *c)
{
	struct tcphdr *tcp = c->pos;

	if ((void *)(tcp + 1) > c->end || (void *)(tcp + 1) > c->limit || tcp->doff < 5)
		return NULL;
	if ((void *)tcp + tcp->doff * 4 > c->limit)
		return NULL;
	c->pos = tcp + 1;
	return tcp;
}

static __always_inline struct udphdr *parse_udphdr(struct hdr_cursor *c)
{
	struct udphdr *udp = c->pos;

	if ((void *)(udp + 1) > c->end || (void *)(udp + 1) > c->limit)
		return NULL;
	if (bpf_ntohs(udp->len) < sizeof(*udp))
		return NULL;
	if (!c->more_fragments && (void *)udp + bpf_ntohs(udp->len) > c->limit)
		return NULL;
	c->pos = udp + 1;
	return udp;
}

static __always_inline struct icmphdr *parse_icmphdr(struct hdr_cursor *c)
{
	struct icmphdr *icmp = c->pos;

	if ((void *)(icmp + 1) > c->end || (void *)(icmp + 1) > c->limit)
		return NULL;
	c->pos = icmp + 1;
	return icmp;
}

/* A fragment other than the first: no L4 header in it. */
static __always_inline int ip_is_later_fragment(const struct iphdr *ip)
{
	return (ip->frag_off & bpf_htons(0x1fff)) != 0;
}

static __always_inline int ip_is_fragment(const struct iphdr *ip)
{
	/* MF set or a non-zero offset; DF (0x4000) alone is not a fragment. */
	return (ip->frag_off & bpf_htons(0x3fff)) != 0;
}

/* Where the rewritable fields of a packet sit. */
struct l4_fields {
	__u16 *sport;          /* TCP/UDP source port, ICMP echo identifier */
	__u16 *dport;          /* TCP/UDP destination port, ICMP echo identifier */
	__u16 *csum;           /* L4 checksum */
	struct tcphdr *tcp;    /* NULL unless TCP */
	struct icmphdr *icmp;  /* NULL unless ICMP (any type) */
	__u8 pseudo;           /* checksum covers the IP pseudo-header (TCP, UDP) */
	__u8 udp;              /* a zero checksum means "none" and stays zero (RFC 768) */
};

#ifndef ICMP_TIMESTAMP
#define ICMP_TIMESTAMP 13
#define ICMP_TIMESTAMPREPLY 14
#endif

/* RFC 5508 REQ-1: the ICMP queries natd translates, as conntrack does: echo (8/0) and timestamp (13/14),
 * both with the identifier where echo has it (RFC 792). query_type says which side: ICMP_ECHO for the
 * requests, ICMP_ECHOREPLY for the replies. (Information and address mask requests are deprecated, RFC
 * 6918.) A request and its reply share one flow per identifier, whatever their type. */
static __always_inline int icmp_is_query(__u8 type, __u8 query_type)
{
	if (query_type == ICMP_ECHO)
		return type == ICMP_ECHO || type == ICMP_TIMESTAMP;
	return type == ICMP_ECHOREPLY || type == ICMP_TIMESTAMPREPLY;
}

/* Finds the ports (ICMP: the query identifier) and checksum of a TCP, UDP or ICMP query packet.
 * Returns 0, -1 for a truncated header (malformed), 1 for anything else (not translatable). */
static __always_inline int parse_l4_fields(struct hdr_cursor *c, const struct iphdr *ip, struct l4_fields *f,
					   __u8 icmp_echo_type)
{
	f->tcp = NULL;
	f->icmp = NULL;
	f->pseudo = 1;
	f->udp = 0;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = parse_tcphdr(c);

		if (!tcp)
			return -1;
		f->tcp = tcp;
		f->sport = &tcp->source;
		f->dport = &tcp->dest;
		f->csum = &tcp->check;
		return 0;
	}
	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = parse_udphdr(c);

		if (!udp)
			return -1;
		f->udp = 1;
		f->sport = &udp->source;
		f->dport = &udp->dest;
		f->csum = &udp->check;
		return 0;
	}
	if (ip->protocol == IPPROTO_ICMP) {
		struct icmphdr *icmp = parse_icmphdr(c);

		if (!icmp)
			return -1;
		f->icmp = icmp;
		if (!icmp_is_query(icmp->type, icmp_echo_type) || icmp->code != 0)
			return 1;
		f->pseudo = 0;
		f->sport = &icmp->un.echo.id;
		f->dport = &icmp->un.echo.id;
		f->csum = &icmp->checksum;
		return 0;
	}
	return 1;
}

#endif /* NATD_PARSING_H */

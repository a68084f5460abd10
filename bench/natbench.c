/* natbench: the traffic tools of natd's benchmarks (bench/run.py compiles this with gcc at start-up).
 *
 *   natbench flood  IFNAME SMAC DMAC SRC DST FLOWS DISTINCT SECONDS MAXCOUNT RATE
 *       Closed-loop small-UDP generator on an AF_PACKET socket: 60-byte frames (Ethernet + IPv4 + UDP +
 *       18 bytes), full checksums, sendmmsg in batches of 64. Blocks on back-pressure (socket send
 *       buffer held by the sender's qdisc). FLOWS distinct source ports (10000 + i) towards port 9000;
 *       DISTINCT=1 makes every packet a new flow instead (source port 2000 + i % 30000, destination port
 *       9000 + i / 30000). RATE > 0 paces the sender (packets/s); 0 = as fast as it can.
 *   natbench udpsrv ADDR PORT LIFETIME          UDP echo server (exits after LIFETIME seconds at most)
 *   natbench udprr  DST PORT SECONDS MAXCOUNT   UDP ping-pong client: RTT p50/p90/p99 in microseconds
 *   natbench tcpsrv ADDR PORT LIFETIME          TCP: read a request, answer 64 bytes, close (epoll)
 *   natbench tcpcrr DST PORT SECONDS MAXCOUNT CONCURRENCY
 *       TCP connect/request/response/close client, CONCURRENCY connections in flight (epoll)
 *
 * Every client loop is bounded in count and time and prints one JSON object on stdout at the end;
 * SIGTERM/SIGINT end a loop early (still printing). Servers run until SIGTERM.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "natbench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void parse_mac(const char *s, uint8_t *mac)
{
	unsigned v[6];
	if (sscanf(s, "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6) {
		fprintf(stderr, "natbench: bad MAC %s\n", s);
		exit(2);
	}
	for (int i = 0; i < 6; i++)
		mac[i] = (uint8_t)v[i];
}

static uint32_t parse_ip(const char *s)
{
	struct in_addr a;
	if (inet_pton(AF_INET, s, &a) != 1) {
		fprintf(stderr, "natbench: bad IPv4 address %s\n", s);
		exit(2);
	}
	return a.s_addr;
}

static uint16_t csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static uint32_t csum_add(uint32_t sum, const void *data, size_t len)
{
	const uint16_t *p = data;
	for (; len > 1; len -= 2)
		sum += *p++;
	if (len)
		sum += *(const uint8_t *)p;
	return sum;
}

/* ------------------------------------------------------------------------------------------ flood */

#define FRAME 60
#define BATCH 64

struct frame_tmpl {
	uint8_t b[FRAME];
};

static void build_frame(uint8_t *f, const uint8_t *smac, const uint8_t *dmac, uint32_t src, uint32_t dst,
			uint16_t sport, uint16_t dport)
{
	uint8_t *ip = f + 14, *udp = f + 34;
	uint16_t ip_len = FRAME - 14, udp_len = FRAME - 34;
	uint32_t sum;

	memset(f, 0, FRAME);
	memcpy(f, dmac, 6);
	memcpy(f + 6, smac, 6);
	f[12] = 0x08;
	f[13] = 0x00;
	ip[0] = 0x45;
	*(uint16_t *)(ip + 2) = htons(ip_len);
	*(uint16_t *)(ip + 6) = htons(0x4000); /* DF */
	ip[8] = 64;
	ip[9] = IPPROTO_UDP;
	memcpy(ip + 12, &src, 4);
	memcpy(ip + 16, &dst, 4);
	*(uint16_t *)(ip + 10) = csum_fold(csum_add(0, ip, 20));
	*(uint16_t *)(udp + 0) = htons(sport);
	*(uint16_t *)(udp + 2) = htons(dport);
	*(uint16_t *)(udp + 4) = htons(udp_len);
	memcpy(udp + 8, "natd-bench-payload", 18);
	/* pseudo header + UDP header and payload */
	sum = csum_add(0, ip + 12, 8);
	sum += htons(IPPROTO_UDP);
	sum += htons(udp_len);
	sum = csum_add(sum, udp, udp_len);
	*(uint16_t *)(udp + 6) = csum_fold(sum) ? csum_fold(sum) : 0xffff;
}

static int cmd_flood(int argc, char **argv)
{
	if (argc != 10) {
		fprintf(stderr, "usage: natbench flood IFNAME SMAC DMAC SRC DST FLOWS DISTINCT SECONDS MAXCOUNT RATE\n");
		return 2;
	}
	uint8_t smac[6], dmac[6];
	parse_mac(argv[1], smac);
	parse_mac(argv[2], dmac);
	uint32_t src = parse_ip(argv[3]), dst = parse_ip(argv[4]);
	long flows = atol(argv[5]);
	int distinct = atoi(argv[6]);
	double seconds = atof(argv[7]);
	long maxcount = atol(argv[8]);
	double rate = atof(argv[9]);
	int ifindex = (int)if_nametoindex(argv[0]);

	if (!ifindex)
		die("if_nametoindex");
	if (flows < 1 || flows > 50000) {
		fprintf(stderr, "natbench: FLOWS must be 1..50000\n");
		return 2;
	}
	int fd = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: send only, never receives */
	if (fd < 0)
		die("socket(AF_PACKET)");
	int sndbuf = 1 << 20;
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
	struct sockaddr_ll sll = { .sll_family = AF_PACKET, .sll_ifindex = ifindex, .sll_halen = 6 };
	memcpy(sll.sll_addr, dmac, 6);

	struct frame_tmpl *tmpl = NULL;
	if (!distinct) {
		tmpl = calloc((size_t)flows, sizeof(*tmpl));
		for (long i = 0; i < flows; i++)
			build_frame(tmpl[i].b, smac, dmac, src, dst, (uint16_t)(10000 + i), 9000);
	}
	static uint8_t buf[BATCH][FRAME];
	struct iovec iov[BATCH];
	struct mmsghdr msg[BATCH];
	memset(msg, 0, sizeof(msg));
	for (int i = 0; i < BATCH; i++) {
		iov[i].iov_base = buf[i];
		iov[i].iov_len = FRAME;
		msg[i].msg_hdr.msg_iov = &iov[i];
		msg[i].msg_hdr.msg_iovlen = 1;
		msg[i].msg_hdr.msg_name = &sll;
		msg[i].msg_hdr.msg_namelen = sizeof(sll);
	}

	long sent = 0, errors = 0, next = 0;
	double t0 = now_s(), deadline = t0 + seconds, t = t0;
	while (!stop && t < deadline && sent < maxcount) {
		int n = BATCH;
		if (maxcount - sent < n)
			n = (int)(maxcount - sent);
		for (int i = 0; i < n; i++, next++) {
			if (distinct)
				build_frame(buf[i], smac, dmac, src, dst, (uint16_t)(2000 + next % 30000),
					    (uint16_t)(9000 + next / 30000));
			else
				memcpy(buf[i], tmpl[next % flows].b, FRAME);
		}
		int done = 0;
		while (done < n && !stop && now_s() < deadline) {
			int r = sendmmsg(fd, msg + done, (unsigned)(n - done), 0);
			if (r < 0) {
				if (errno == EINTR)
					continue;
				if (errno == ENOBUFS || errno == EAGAIN) {
					errors++;
					usleep(50);
					continue;
				}
				die("sendmmsg");
			}
			done += r;
		}
		sent += done;
		next -= n - done;
		t = now_s();
		if (rate > 0) {
			double due = t0 + sent / rate;
			if (due > t) {
				struct timespec ts = { .tv_sec = (time_t)(due - t), .tv_nsec = (long)((due - t - (long)(due - t)) * 1e9) };
				nanosleep(&ts, NULL);
				t = now_s();
			}
		}
	}
	printf("{\"sent\": %ld, \"seconds\": %.6f, \"send_errors\": %ld}\n", sent, now_s() - t0, errors);
	return 0;
}

/* ------------------------------------------------------------------------------------------ UDP rr */

static int bound_socket(int type, const char *addr, int port)
{
	int fd = socket(AF_INET, type, 0);
	if (fd < 0)
		die("socket");
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				  .sin_addr.s_addr = parse_ip(addr) };
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("bind");
	return fd;
}

static int cmd_udpsrv(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: natbench udpsrv ADDR PORT LIFETIME\n");
		return 2;
	}
	int fd = bound_socket(SOCK_DGRAM, argv[0], atoi(argv[1]));
	double end = now_s() + atof(argv[2]);
	struct timeval tv = { .tv_sec = 0, .tv_usec = 200000 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	char buf[2048];
	printf("ready\n");
	fflush(stdout);
	while (!stop && now_s() < end) {
		struct sockaddr_in peer;
		socklen_t plen = sizeof(peer);
		ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &plen);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("recvfrom");
		}
		sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, plen);
	}
	return 0;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double pct(const double *v, long n, double p)
{
	if (n == 0)
		return 0;
	long i = (long)(p * (double)(n - 1) + 0.5);
	return v[i];
}

static int cmd_udprr(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: natbench udprr DST PORT SECONDS MAXCOUNT\n");
		return 2;
	}
	double seconds = atof(argv[2]);
	long maxcount = atol(argv[3]);
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		die("socket");
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1])),
				  .sin_addr.s_addr = parse_ip(argv[0]) };
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("connect");
	struct timeval tv = { .tv_sec = 0, .tv_usec = 200000 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	double *rtt = calloc((size_t)maxcount + 1, sizeof(double));
	long n = 0, lost = 0;
	char buf[64] = "natd-bench-rr", in[64];
	double t0 = now_s(), deadline = t0 + seconds;
	while (!stop && n < maxcount && now_s() < deadline && lost < 1000) {
		double s = now_s();
		if (send(fd, buf, 32, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("send");
		}
		if (recv(fd, in, sizeof(in), 0) < 0) {
			if (errno == EAGAIN || errno == EINTR) {
				lost++;
				continue;
			}
			die("recv");
		}
		rtt[n++] = (now_s() - s) * 1e6;
	}
	double el = now_s() - t0;
	qsort(rtt, (size_t)n, sizeof(double), cmp_double);
	printf("{\"count\": %ld, \"lost\": %ld, \"seconds\": %.6f, \"p50_us\": %.2f, \"p90_us\": %.2f, "
	       "\"p99_us\": %.2f, \"max_us\": %.2f}\n",
	       n, lost, el, pct(rtt, n, 0.5), pct(rtt, n, 0.9), pct(rtt, n, 0.99), n ? rtt[n - 1] : 0.0);
	return 0;
}

/* ------------------------------------------------------------------------------------------ TCP crr */

#define RESP_LEN 64

static void set_nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static int cmd_tcpsrv(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: natbench tcpsrv ADDR PORT LIFETIME\n");
		return 2;
	}
	int lfd = bound_socket(SOCK_STREAM, argv[0], atoi(argv[1]));
	double end = now_s() + atof(argv[2]);
	if (listen(lfd, 4096) < 0)
		die("listen");
	set_nonblock(lfd);
	int ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = lfd };
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	char resp[RESP_LEN], req[256];
	memset(resp, 'r', sizeof(resp));
	printf("ready\n");
	fflush(stdout);
	struct epoll_event evs[256];
	while (!stop && now_s() < end) {
		int n = epoll_wait(ep, evs, 256, 200);
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == lfd) {
				for (;;) {
					int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
					if (c < 0)
						break;
					struct epoll_event cev = { .events = EPOLLIN, .data.fd = c };
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
				}
				continue;
			}
			ssize_t r = read(fd, req, sizeof(req));
			if (r < 0 && errno == EAGAIN)
				continue;
			if (r > 0)
				(void)!write(fd, resp, sizeof(resp));
			close(fd); /* the server closes first: its side keeps the TIME_WAIT */
		}
	}
	return 0;
}

struct conn {
	int fd;
	int got;
	double start;
};

static int cmd_tcpcrr(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: natbench tcpcrr DST PORT SECONDS MAXCOUNT CONCURRENCY\n");
		return 2;
	}
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1])),
				  .sin_addr.s_addr = parse_ip(argv[0]) };
	double seconds = atof(argv[2]);
	long maxcount = atol(argv[3]);
	int conc = atoi(argv[4]);
	if (conc < 1 || conc > 256) {
		fprintf(stderr, "natbench: CONCURRENCY must be 1..256\n");
		return 2;
	}
	int ep = epoll_create1(0);
	struct conn *cs = calloc((size_t)conc, sizeof(*cs));
	double *lat = calloc((size_t)maxcount + 1, sizeof(double));
	long started = 0, done = 0, failed = 0;
	char req[32], buf[RESP_LEN + 16];
	memset(req, 'q', sizeof(req));
	double t0 = now_s(), deadline = t0 + seconds;

	/* open one connection in slot i; returns 0 when nothing was started */
	#define OPEN(i)                                                                              \
		do {                                                                                 \
			cs[i].fd = -1;                                                               \
			if (started >= maxcount || now_s() >= deadline || stop)                      \
				break;                                                               \
			int s_ = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);                    \
			if (s_ < 0)                                                                  \
				die("socket");                                                       \
			int one_ = 1;                                                                \
			setsockopt(s_, IPPROTO_TCP, TCP_NODELAY, &one_, sizeof(one_));               \
			cs[i].start = now_s();                                                       \
			if (connect(s_, (struct sockaddr *)&sa, sizeof(sa)) < 0 && errno != EINPROGRESS) \
				die("connect");                                                      \
			cs[i].fd = s_;                                                               \
			cs[i].got = -1; /* connecting */                                             \
			struct epoll_event e_ = { .events = EPOLLOUT, .data.u32 = (uint32_t)(i) };   \
			epoll_ctl(ep, EPOLL_CTL_ADD, s_, &e_);                                       \
			started++;                                                                   \
		} while (0)

	int active = 0;
	for (int i = 0; i < conc; i++) {
		OPEN(i);
		if (cs[i].fd >= 0)
			active++;
	}
	struct epoll_event evs[256];
	while (active > 0 && now_s() < deadline + 3.0) {
		int n = epoll_wait(ep, evs, 256, 200);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (int k = 0; k < n; k++) {
			int i = (int)evs[k].data.u32;
			struct conn *c = &cs[i];
			int finished = 0, ok = 0;
			if (c->got < 0) {
				int err = 0;
				socklen_t el = sizeof(err);
				getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
				if (err) {
					finished = 1;
				} else if (write(c->fd, req, sizeof(req)) == (ssize_t)sizeof(req)) {
					c->got = 0;
					struct epoll_event e = { .events = EPOLLIN, .data.u32 = (uint32_t)i };
					epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
				} else {
					finished = 1;
				}
			} else {
				ssize_t r = read(c->fd, buf, sizeof(buf));
				if (r > 0) {
					c->got += (int)r;
				} else if (r == 0) {
					finished = 1;
					ok = c->got >= RESP_LEN;
				} else if (errno != EAGAIN) {
					finished = 1;
				}
			}
			if (finished) {
				close(c->fd);
				if (ok)
					lat[done++] = (now_s() - c->start) * 1e6;
				else
					failed++;
				active--;
				OPEN(i);
				if (c->fd >= 0)
					active++;
			}
		}
		if (stop)
			break;
	}
	double el = now_s() - t0;
	qsort(lat, (size_t)done, sizeof(double), cmp_double);
	printf("{\"count\": %ld, \"failed\": %ld, \"unfinished\": %d, \"seconds\": %.6f, \"p50_us\": %.2f, "
	       "\"p99_us\": %.2f}\n", done, failed, active, el, pct(lat, done, 0.5), pct(lat, done, 0.99));
	return 0;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_signal };
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2) {
		fprintf(stderr, "usage: natbench flood|udpsrv|udprr|tcpsrv|tcpcrr ARGS...\n");
		return 2;
	}
	const char *cmd = argv[1];
	argc -= 2;
	argv += 2;
	if (!strcmp(cmd, "flood"))
		return cmd_flood(argc, argv);
	if (!strcmp(cmd, "udpsrv"))
		return cmd_udpsrv(argc, argv);
	if (!strcmp(cmd, "udprr"))
		return cmd_udprr(argc, argv);
	if (!strcmp(cmd, "tcpsrv"))
		return cmd_tcpsrv(argc, argv);
	if (!strcmp(cmd, "tcpcrr"))
		return cmd_tcpcrr(argc, argv);
	fprintf(stderr, "natbench: unknown command %s\n", cmd);
	return 2;
}

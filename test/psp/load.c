/*
 * market-test-psp-load: a small load generator for market-test-psp.
 *
 * N keep-alive connections, each sending one request, waiting for the whole
 * answer and sending the next, for a fixed time; then the rate, the
 * latency percentiles and the count of non-2xx answers.  One thread, epoll.
 *
 *   market-test-psp-load --port P [--connections 32] [--seconds 5]
 *                        [--endpoint stripe|adyen|health]
 *
 * "stripe" creates and confirms a PaymentIntent (manual capture) with a new
 * Idempotency-Key each time: the server's heaviest path.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct lconn
{
	int			fd;
	char		in[65536];
	size_t		inlen;
	char		out[2048];
	size_t		outlen,
				outpos;
	double		sent_at;
} lconn;

static double *lat;
static size_t nlat, caplat;
static long ok2xx, other, seqno;
static const char *endpoint = "stripe";

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double) ts.tv_sec + ts.tv_nsec / 1e9;
}

/* the next request into c->out */
static void
make_request(lconn *c)
{
	char		body[512];
	int			bl;

	seqno++;
	if (strcmp(endpoint, "health") == 0)
	{
		c->outlen = (size_t) snprintf(c->out, sizeof(c->out),
									  "GET /_control/health HTTP/1.1\r\nHost: x\r\n\r\n");
	}
	else if (strcmp(endpoint, "adyen") == 0)
	{
		bl = snprintf(body, sizeof(body),
					  "{\"amount\":{\"value\":1000,\"currency\":\"EUR\"},\"reference\":\"load-%ld\","
					  "\"paymentMethod\":{\"type\":\"scheme\",\"storedPaymentMethodId\":\"pm_card_visa\"},"
					  "\"merchantAccount\":\"LoadTest\"}", seqno);
		c->outlen = (size_t) snprintf(c->out, sizeof(c->out),
									  "POST /v71/payments HTTP/1.1\r\nHost: x\r\nX-API-Key: load\r\n"
									  "Idempotency-Key: load-%d-%ld\r\nContent-Type: application/json\r\n"
									  "Content-Length: %d\r\n\r\n%s", (int) getpid(), seqno, bl, body);
	}
	else
	{
		bl = snprintf(body, sizeof(body),
					  "amount=1000&currency=usd&payment_method=pm_card_visa&capture_method=manual"
					  "&confirm=true&metadata%%5Bpayment_id%%5D=load-%ld", seqno);
		c->outlen = (size_t) snprintf(c->out, sizeof(c->out),
									  "POST /v1/payment_intents HTTP/1.1\r\nHost: x\r\n"
									  "Authorization: Bearer sk_test_load\r\nIdempotency-Key: load-%d-%ld\r\n"
									  "Content-Type: application/x-www-form-urlencoded\r\n"
									  "Content-Length: %d\r\n\r\n%s", (int) getpid(), seqno, bl, body);
	}
	c->outpos = 0;
	c->sent_at = now_s();
}

static int
flush_out(lconn *c)
{
	while (c->outpos < c->outlen)
	{
		ssize_t		n = send(c->fd, c->out + c->outpos, c->outlen - c->outpos, MSG_NOSIGNAL);

		if (n < 0)
			return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
		c->outpos += (size_t) n;
	}
	return 0;
}

/* consume complete responses; 1 if one was completed */
static int
take_response(lconn *c)
{
	char	   *end;
	char	   *cl;
	size_t		hlen,
				blen = 0,
				total;
	int			status;

	c->in[c->inlen] = '\0';
	end = strstr(c->in, "\r\n\r\n");
	if (!end)
		return 0;
	hlen = (size_t) (end - c->in) + 4;
	cl = strcasestr(c->in, "\r\nContent-Length:");
	if (cl && cl < end)
		blen = strtoul(cl + 17, NULL, 10);
	total = hlen + blen;
	if (c->inlen < total)
		return 0;
	status = atoi(c->in + 9);
	if (status >= 200 && status < 300)
		ok2xx++;
	else
		other++;
	if (nlat == caplat)
	{
		caplat = caplat ? caplat * 2 : 65536;
		lat = realloc(lat, caplat * sizeof(double));
		if (!lat)
			abort();
	}
	lat[nlat++] = (now_s() - c->sent_at) * 1000.0;
	memmove(c->in, c->in + total, c->inlen - total);
	c->inlen -= total;
	return 1;
}

static int
dcmp(const void *a, const void *b)
{
	double		x = *(const double *) a,
				y = *(const double *) b;

	return x < y ? -1 : x > y;
}

int
main(int argc, char **argv)
{
	int			port = 0,
				nconn = 32,
				i;
	double		seconds = 5;
	int			ep;
	lconn	   *conns;
	struct epoll_event evs[256];
	double		t0,
				tend;

	for (i = 1; i + 1 < argc; i += 2)
	{
		if (strcmp(argv[i], "--port") == 0)
			port = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--connections") == 0)
			nconn = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--seconds") == 0)
			seconds = atof(argv[i + 1]);
		else if (strcmp(argv[i], "--endpoint") == 0)
			endpoint = argv[i + 1];
		else
			break;
	}
	if (port <= 0 || nconn <= 0 || seconds <= 0 || i < argc)
	{
		fprintf(stderr, "usage: market-test-psp-load --port P [--connections 32] [--seconds 5] "
				"[--endpoint stripe|adyen|health]\n");
		return 2;
	}
	ep = epoll_create1(0);
	conns = calloc((size_t) nconn, sizeof(lconn));
	if (!conns)
		return 1;
	for (i = 0; i < nconn; i++)
	{
		struct sockaddr_in a;
		int			one = 1;
		struct epoll_event ev;
		lconn	   *c = &conns[i];

		c->fd = socket(AF_INET, SOCK_STREAM, 0);
		memset(&a, 0, sizeof(a));
		a.sin_family = AF_INET;
		a.sin_port = htons((uint16_t) port);
		a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		if (connect(c->fd, (struct sockaddr *) &a, sizeof(a)) < 0)
		{
			perror("connect");
			return 1;
		}
		setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		ev.events = EPOLLIN;
		ev.data.ptr = c;
		epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
	}
	t0 = now_s();
	tend = t0 + seconds;
	for (i = 0; i < nconn; i++)
	{
		make_request(&conns[i]);
		if (flush_out(&conns[i]) < 0)
			return 1;
	}
	while (now_s() < tend)
	{
		int			n = epoll_wait(ep, evs, 256, 100);

		for (i = 0; i < n; i++)
		{
			lconn	   *c = evs[i].data.ptr;
			ssize_t		r = recv(c->fd, c->in + c->inlen, sizeof(c->in) - 1 - c->inlen, 0);

			if (r <= 0)
			{
				if (r < 0 && (errno == EAGAIN || errno == EINTR))
					continue;
				fprintf(stderr, "connection closed by the server\n");
				return 1;
			}
			c->inlen += (size_t) r;
			while (take_response(c))
			{
				if (now_s() >= tend)
					break;
				make_request(c);
				if (flush_out(c) < 0)
					return 1;
			}
		}
	}
	{
		double		el = now_s() - t0;

		qsort(lat, nlat, sizeof(double), dcmp);
		printf("endpoint=%s connections=%d seconds=%.2f requests=%zu rate=%.0f/s "
			   "p50=%.3fms p99=%.3fms max=%.3fms non2xx=%ld\n",
			   endpoint, nconn, el, nlat, nlat / el,
			   nlat ? lat[nlat / 2] : 0, nlat ? lat[(size_t) (nlat * 0.99)] : 0,
			   nlat ? lat[nlat - 1] : 0, other);
	}
	return other ? 1 : 0;
}

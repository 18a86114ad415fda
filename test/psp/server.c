/*
 * server.c: main(), the epoll event loop, HTTP/1.1 and the listeners.
 *
 * One thread, non-blocking sockets, level-triggered epoll.  Each connection
 * handles one request at a time (pipelined requests wait in its input
 * buffer); a response can be delayed (latency and timeout faults), and then
 * sits in a min-heap of pending deliveries ordered by deadline.  A pending
 * delivery outlives its connection: when the client gives up first, the
 * delivery still fires at its deadline to end the request's "in flight"
 * state in the idempotency store (psp_delivered).
 *
 * Listeners: the main port (every personality and /_control), the control
 * port (/_control only; it stays open when a "down" fault closes the
 * others) and, on request, one port per personality.  psp_listener_open()
 * says which should be open; the loop closes and reopens them to match, so
 * a downed PSP gives a real "connection refused".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "psp.h"

#define MAX_HEAD (64 * 1024)
#define MAX_BODY (8 * 1024 * 1024)

enum
{
	OBJ_LISTENER, OBJ_CONN
};

typedef struct listener
{
	int			obj;			/* OBJ_LISTENER */
	int			kind;			/* LISTEN_* */
	int			fd;				/* -1 while closed */
	int			port;			/* -1: not configured */
} listener;

struct pending;

typedef struct conn
{
	int			obj;			/* OBJ_CONN */
	int			fd;
	int			listener;
	buf_t		in;
	buf_t		out;
	size_t		out_pos;
	int			closing;		/* close once out is flushed */
	int			epout;			/* EPOLLOUT registered */
	int			sent_continue;	/* "100 Continue" sent for the request */
	struct pending *pend;
} conn;

typedef struct pending
{
	long long	deadline;
	conn	   *c;				/* NULL once the connection is gone */
	int			action;
	int			keepalive;
	buf_t		bytes;
	struct idem *idem;
} pending;

static int	epfd;
static listener listeners[LISTEN_N];
static pending **heap;
static size_t heap_n, heap_cap;
static volatile sig_atomic_t stop_flag;

/* milliseconds of a monotonic clock */
long long
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* value of a request header (case-insensitive name), or NULL */
const char *
http_header(const http_req *r, const char *name)
{
	int			i;

	for (i = 0; i < r->nh; i++)
		if (strcasecmp(r->hname[i], name) == 0)
			return r->hval[i];
	return NULL;
}

/* reason phrase of a status code */
const char *
http_reason(int status)
{
	switch (status)
	{
		case 100: return "Continue";
		case 200: return "OK";
		case 201: return "Created";
		case 204: return "No Content";
		case 400: return "Bad Request";
		case 401: return "Unauthorized";
		case 402: return "Payment Required";
		case 403: return "Forbidden";
		case 404: return "Not Found";
		case 405: return "Method Not Allowed";
		case 409: return "Conflict";
		case 411: return "Length Required";
		case 413: return "Payload Too Large";
		case 422: return "Unprocessable Entity";
		case 429: return "Too Many Requests";
		case 431: return "Request Header Fields Too Large";
		case 500: return "Internal Server Error";
		case 502: return "Bad Gateway";
		case 503: return "Service Unavailable";
		case 504: return "Gateway Timeout";
		default: return "Unknown";
	}
}

/* ---------------------------------------------------------------- heap */

static void
heap_push(pending *p)
{
	size_t		i;

	if (heap_n == heap_cap)
	{
		heap_cap = heap_cap ? heap_cap * 2 : 64;
		heap = xrealloc(heap, heap_cap * sizeof(pending *));
	}
	i = heap_n++;
	while (i > 0 && heap[(i - 1) / 2]->deadline > p->deadline)
	{
		heap[i] = heap[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	heap[i] = p;
}

static pending *
heap_pop(void)
{
	pending    *top = heap[0];
	pending    *last = heap[--heap_n];
	size_t		i = 0;

	for (;;)
	{
		size_t		l = 2 * i + 1,
					m = i;

		if (l >= heap_n)
			break;
		m = l;
		if (l + 1 < heap_n && heap[l + 1]->deadline < heap[l]->deadline)
			m = l + 1;
		if (heap[m]->deadline >= last->deadline)
			break;
		heap[i] = heap[m];
		i = m;
	}
	if (heap_n)
		heap[i] = last;
	return top;
}

/* ---------------------------------------------------------------- connections */

static void
conn_close(conn *c, int reset)
{
	if (reset)
	{
		struct linger lg = {1, 0};

		setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	}
	epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	if (c->pend)
		c->pend->c = NULL;
	buf_free(&c->in);
	buf_free(&c->out);
	free(c);
	psp_note_connection(-1);
}

static void
conn_want_out(conn *c, int on)
{
	struct epoll_event ev;

	if (c->epout == on)
		return;
	ev.events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0);
	ev.data.ptr = c;
	epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
	c->epout = on;
}

/* write what we can; 0 if the connection is gone */
static int
conn_flush(conn *c)
{
	while (c->out_pos < c->out.len)
	{
		ssize_t		n = send(c->fd, c->out.p + c->out_pos, c->out.len - c->out_pos,
							 MSG_NOSIGNAL);

		if (n < 0)
		{
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
			{
				conn_want_out(c, 1);
				return 1;
			}
			conn_close(c, 0);
			return 0;
		}
		c->out_pos += (size_t) n;
	}
	c->out.len = 0;
	c->out_pos = 0;
	conn_want_out(c, 0);
	if (c->closing)
	{
		conn_close(c, 0);
		return 0;
	}
	return 1;
}

/* serialise a response into bytes */
static void
render(const http_resp *r, int keepalive, buf_t *out)
{
	buf_printf(out, "HTTP/1.1 %d %s\r\nServer: market-test-psp\r\n", r->status,
			   http_reason(r->status));
	if (!(r->headers.p && strcasestr(r->headers.p, "Content-Type:")) && r->status != 204)
		buf_adds(out, "Content-Type: application/json\r\n");
	buf_printf(out, "Content-Length: %zu\r\n", r->body.len);
	if (!keepalive)
		buf_adds(out, "Connection: close\r\n");
	if (r->headers.len)
		buf_add(out, r->headers.p, r->headers.len);
	buf_adds(out, "\r\n");
	if (r->body.len)
		buf_add(out, r->body.p, r->body.len);
}

/* carry out a response's action on a live connection; 0 if it is gone */
static int
deliver(conn *c, int action, int keepalive, buf_t *bytes)
{
	if (action == ACT_CLOSE || action == ACT_RESET)
	{
		conn_close(c, action == ACT_RESET);
		return 0;
	}
	buf_add(&c->out, bytes->p, bytes->len);
	if (!keepalive)
		c->closing = 1;
	return conn_flush(c);
}

/* case-insensitive search for a header in a raw header block */
static const char *
raw_header(const char *head, size_t len, const char *name, size_t *vlen)
{
	size_t		nl = strlen(name);
	const char *p = memchr(head, '\n', len);

	while (p && (size_t) (p - head) + 1 < len)
	{
		const char *line = p + 1;
		const char *eol = memchr(line, '\n', len - (size_t) (line - head));

		if (!eol)
			break;
		if ((size_t) (eol - line) > nl && strncasecmp(line, name, nl) == 0 && line[nl] == ':')
		{
			const char *v = line + nl + 1;
			const char *ve = eol;

			while (v < ve && (*v == ' ' || *v == '\t'))
				v++;
			while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t'))
				ve--;
			*vlen = (size_t) (ve - v);
			return v;
		}
		p = eol;
	}
	return NULL;
}

static int
simple_error(conn *c, int status, const char *msg)
{
	http_resp	r;
	buf_t		bytes;
	int			alive;

	memset(&r, 0, sizeof(r));
	r.status = status;
	buf_printf(&r.body, "{\"error\":{\"type\":\"invalid_request_error\",\"message\":\"%s\"}}", msg);
	buf_init(&bytes);
	render(&r, 0, &bytes);
	buf_free(&r.body);
	alive = deliver(c, ACT_SEND, 0, &bytes);
	buf_free(&bytes);
	return alive;
}

static int	process(conn *c);

/* a pending delivery's deadline has come */
static void
fire(pending *p)
{
	conn	   *c = p->c;

	if (p->idem)
		psp_delivered(p->idem);
	if (c)
	{
		c->pend = NULL;
		if (deliver(c, p->action, p->keepalive, &p->bytes))
			process(c);
	}
	buf_free(&p->bytes);
	free(p);
}

/* handle every complete request in the input buffer; 0 if c is gone */
static int
process(conn *c)
{
	while (!c->pend && !c->closing && c->in.len)
	{
		const char *head = c->in.p;
		const char *end = memmem(head, c->in.len, "\r\n\r\n", 4);
		size_t		hlen,
					vlen,
					clen = 0,
					total;
		const char *v;
		int			keepalive;
		http_req	req;
		http_resp	resp;
		char	   *hcopy,
				   *line,
				   *next,
				   *sp,
				   *sp2;
		buf_t		bytes;

		if (!end)
		{
			if (c->in.len > MAX_HEAD)
				return simple_error(c, 431, "request head too large");
			return 1;
		}
		hlen = (size_t) (end - head) + 4;
		if (raw_header(head, hlen, "Transfer-Encoding", &vlen))
		{
			return simple_error(c, 411, "chunked request bodies are not supported; send Content-Length");
		}
		v = raw_header(head, hlen, "Content-Length", &vlen);
		if (v)
		{
			char		tmp[24];
			char	   *e;

			if (vlen == 0 || vlen >= sizeof(tmp))
			{
				return simple_error(c, 400, "bad Content-Length");
			}
			memcpy(tmp, v, vlen);
			tmp[vlen] = '\0';
			clen = strtoul(tmp, &e, 10);
			if (*e || clen > MAX_BODY)
			{
				return simple_error(c, clen > MAX_BODY ? 413 : 400, "bad Content-Length");
			}
		}
		total = hlen + clen;
		if (c->in.len < total)
		{
			v = raw_header(head, hlen, "Expect", &vlen);
			if (v && !c->sent_continue && vlen == 12 && strncasecmp(v, "100-continue", 12) == 0)
			{
				c->sent_continue = 1;
				buf_adds(&c->out, "HTTP/1.1 100 Continue\r\n\r\n");
				return conn_flush(c);
			}
			return 1;
		}
		c->sent_continue = 0;

		/* parse a copy of the head */
		memset(&req, 0, sizeof(req));
		hcopy = xstrndup(head, hlen - 2);
		line = hcopy;
		next = strstr(line, "\r\n");
		*next = '\0';
		sp = strchr(line, ' ');
		sp2 = sp ? strchr(sp + 1, ' ') : NULL;
		if (!sp || !sp2 || (size_t) (sp - line) >= sizeof(req.method) ||
			strncmp(sp2 + 1, "HTTP/1.", 7) != 0)
		{
			free(hcopy);
			return simple_error(c, 400, "bad request line");
		}
		memcpy(req.method, line, (size_t) (sp - line));
		*sp2 = '\0';
		req.path = sp + 1;
		keepalive = sp2[8] == '1';
		{
			char	   *q = strchr(req.path, '?');

			req.query = "";
			if (q)
			{
				*q = '\0';
				req.query = q + 1;
			}
		}
		line = next + 2;
		while (*line)
		{
			char	   *colon;
			char	   *val;
			char	   *ve;

			next = strstr(line, "\r\n");
			if (!next)
				break;
			*next = '\0';
			colon = strchr(line, ':');
			if (colon && req.nh < MAX_HEADERS)
			{
				*colon = '\0';
				val = colon + 1;
				while (*val == ' ' || *val == '\t')
					val++;
				ve = val + strlen(val);
				while (ve > val && (ve[-1] == ' ' || ve[-1] == '\t'))
					*--ve = '\0';
				req.hname[req.nh] = line;
				req.hval[req.nh] = val;
				req.nh++;
			}
			line = next + 2;
		}
		v = http_header(&req, "Connection");
		if (v && strcasecmp(v, "close") == 0)
			keepalive = 0;
		else if (v && strcasecmp(v, "keep-alive") == 0)
			keepalive = 1;
		req.body = c->in.p + hlen;
		req.body_len = clen;
		req.listener = c->listener;

		memset(&resp, 0, sizeof(resp));
		psp_handle(&req, &resp);
		free(hcopy);

		/* drop the request from the input buffer */
		memmove(c->in.p, c->in.p + total, c->in.len - total);
		c->in.len -= total;

		buf_init(&bytes);
		if (resp.action == ACT_SEND)
			render(&resp, keepalive, &bytes);
		buf_free(&resp.headers);
		buf_free(&resp.body);
		if (resp.delay_ms <= 0 && resp.idem)
		{
			psp_delivered(resp.idem);
			resp.idem = NULL;
		}
		if (resp.delay_ms > 0)
		{
			pending    *p = xcalloc(1, sizeof(pending));

			p->deadline = now_ms() + (resp.delay_ms > 0 ? resp.delay_ms : 0);
			p->c = c;
			p->action = resp.action;
			p->keepalive = keepalive;
			p->bytes = bytes;
			p->idem = resp.idem;
			c->pend = p;
			heap_push(p);
			return 1;
		}
		if (!deliver(c, resp.action, keepalive, &bytes))
		{
			buf_free(&bytes);
			return 0;
		}
		buf_free(&bytes);
	}
	return 1;
}

static void
conn_read(conn *c)
{
	for (;;)
	{
		ssize_t		n;

		buf_reserve(&c->in, 16384);
		n = recv(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len - 1, 0);
		if (n > 0)
		{
			c->in.len += (size_t) n;
			c->in.p[c->in.len] = '\0';
			if (c->in.len > MAX_HEAD + MAX_BODY)
			{
				conn_close(c, 1);
				return;
			}
			continue;
		}
		if (n == 0)
		{
			/* peer closed: answer what came; a delayed answer finds it gone */
			if (process(c))
				conn_close(c, 0);
			return;
		}
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			break;
		conn_close(c, 0);
		return;
	}
	process(c);
}

/* ---------------------------------------------------------------- listeners */

static int
listen_on(int port)
{
	struct sockaddr_in a;
	int			one = 1;
	int			fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons((uint16_t) port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(fd, (struct sockaddr *) &a, sizeof(a)) < 0 || listen(fd, 1024) < 0)
	{
		close(fd);
		return -1;
	}
	return fd;
}

static int
open_listener(listener *l)
{
	struct sockaddr_in a;
	socklen_t	al = sizeof(a);
	struct epoll_event ev;

	l->fd = listen_on(l->port);
	if (l->fd < 0)
		return -1;
	getsockname(l->fd, (struct sockaddr *) &a, &al);
	l->port = ntohs(a.sin_port);
	ev.events = EPOLLIN;
	ev.data.ptr = l;
	epoll_ctl(epfd, EPOLL_CTL_ADD, l->fd, &ev);
	return 0;
}

/* open or close listeners to match what the faults say */
static void
reconcile_listeners(void)
{
	int			i;

	for (i = 0; i < LISTEN_N; i++)
	{
		listener   *l = &listeners[i];
		int			want;

		if (l->port < 0)
			continue;
		want = psp_listener_open(i);
		if (want && l->fd < 0)
		{
			if (open_listener(l) < 0)
				fprintf(stderr, "market-test-psp: cannot reopen port %d: %s\n",
						l->port, strerror(errno));
		}
		else if (!want && l->fd >= 0)
		{
			epoll_ctl(epfd, EPOLL_CTL_DEL, l->fd, NULL);
			close(l->fd);
			l->fd = -1;
		}
	}
}

static void
do_accept(listener *l)
{
	for (;;)
	{
		int			fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		int			one = 1;
		conn	   *c;
		struct epoll_event ev;

		if (fd < 0)
			return;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		c = xcalloc(1, sizeof(conn));
		c->obj = OBJ_CONN;
		c->fd = fd;
		c->listener = l->kind;
		ev.events = EPOLLIN | EPOLLRDHUP;
		ev.data.ptr = c;
		if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
		{
			close(fd);
			free(c);
			continue;
		}
		psp_note_connection(1);
	}
}

static void
on_signal(int sig)
{
	(void) sig;
	stop_flag = 1;
}

static void
usage(FILE *f)
{
	fputs("usage: market-test-psp [options]\n"
		  "  --port N                 main port (every PSP and /_control); 0 = pick one (default)\n"
		  "  --control-port N         control-only port; 0 = pick one (default)\n"
		  "  --stripe-port N          also serve Stripe alone on port N (0 = pick one)\n"
		  "  --adyen-port N           also serve Adyen alone on port N (0 = pick one)\n"
		  "  --paypal-port N          also serve PayPal alone on port N (0 = pick one)\n"
		  "  --seed N                 seed of the fault probabilities and ids\n"
		  "  --stripe-webhook-secret S   default Stripe webhook secret (whsec_test_secret)\n"
		  "  --adyen-hmac-key HEX     default Adyen HMAC key (hex)\n"
		  "  --self-test              check SHA-256 and HMAC against FIPS 180 / RFC 4231 and exit\n"
		  "On start it prints one JSON line with the ports it listens on.\n", f);
}

int
main(int argc, char **argv)
{
	int			i;
	int			ports[LISTEN_N];
	uint64_t	seed = (uint64_t) time(NULL) ^ ((uint64_t) getpid() << 16);
	struct epoll_event evs[256];

	for (i = 0; i < LISTEN_N; i++)
	{
		listeners[i].obj = OBJ_LISTENER;
		listeners[i].kind = i;
		listeners[i].fd = -1;
		listeners[i].port = -1;
	}
	listeners[LISTEN_MAIN].port = 0;
	listeners[LISTEN_CONTROL].port = 0;

	for (i = 1; i < argc; i++)
	{
		const char *a = argv[i];
		const char *val = (i + 1 < argc) ? argv[i + 1] : NULL;
		int			k = -1;

		if (strcmp(a, "--self-test") == 0)
		{
			int			f = crypto_selftest(stdout);

			printf("%s\n", f ? "self-test FAILED" : "self-test passed");
			return f ? 1 : 0;
		}
		if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0)
		{
			usage(stdout);
			return 0;
		}
		if (!val)
		{
			usage(stderr);
			return 2;
		}
		if (strcmp(a, "--port") == 0)
			k = LISTEN_MAIN;
		else if (strcmp(a, "--control-port") == 0)
			k = LISTEN_CONTROL;
		else if (strcmp(a, "--stripe-port") == 0)
			k = LISTEN_STRIPE;
		else if (strcmp(a, "--adyen-port") == 0)
			k = LISTEN_ADYEN;
		else if (strcmp(a, "--paypal-port") == 0)
			k = LISTEN_PAYPAL;
		else if (strcmp(a, "--seed") == 0)
			seed = strtoull(val, NULL, 10);
		else if (strcmp(a, "--stripe-webhook-secret") == 0)
			psp_set_secrets(val, NULL);
		else if (strcmp(a, "--adyen-hmac-key") == 0)
			psp_set_secrets(NULL, val);
		else
		{
			usage(stderr);
			return 2;
		}
		if (k >= 0)
		{
			char	   *e;
			long		p = strtol(val, &e, 10);

			if (*e || p < 0 || p > 65535)
			{
				fprintf(stderr, "market-test-psp: bad port %s\n", val);
				return 2;
			}
			listeners[k].port = (int) p;
		}
		i++;
	}

	signal(SIGPIPE, SIG_IGN);
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	psp_init(seed);

	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (epfd < 0)
	{
		perror("epoll_create1");
		return 1;
	}
	for (i = 0; i < LISTEN_N; i++)
	{
		if (listeners[i].port < 0)
			continue;
		if (open_listener(&listeners[i]) < 0)
		{
			fprintf(stderr, "market-test-psp: cannot listen on 127.0.0.1:%d: %s\n",
					listeners[i].port, strerror(errno));
			return 1;
		}
	}
	for (i = 0; i < LISTEN_N; i++)
		ports[i] = listeners[i].port;
	psp_set_ports(ports);
	printf("{\"port\":%d,\"control_port\":%d", ports[LISTEN_MAIN], ports[LISTEN_CONTROL]);
	{
		static const char *names[] = {NULL, NULL, "stripe_port", "adyen_port", "paypal_port"};

		for (i = LISTEN_STRIPE; i < LISTEN_N; i++)
			if (ports[i] >= 0)
				printf(",\"%s\":%d", names[i], ports[i]);
	}
	printf(",\"pid\":%d}\n", (int) getpid());
	fflush(stdout);

	while (!stop_flag)
	{
		long long	now = now_ms();
		long long	next;
		long		timeout;
		int			n;

		while (heap_n && heap[0]->deadline <= now)
			fire(heap_pop());
		psp_tick();
		reconcile_listeners();

		next = now + 1000;
		if (heap_n && heap[0]->deadline < next)
			next = heap[0]->deadline;
		{
			long		d = psp_next_deadline_ms();

			if (d >= 0 && d < next)
				next = d;
		}
		timeout = (long) (next - now);
		if (timeout < 0)
			timeout = 0;
		n = epoll_wait(epfd, evs, 256, (int) timeout);
		if (n < 0)
		{
			if (errno == EINTR)
				continue;
			perror("epoll_wait");
			return 1;
		}
		for (i = 0; i < n; i++)
		{
			int			obj = *(int *) evs[i].data.ptr;

			if (obj == OBJ_LISTENER)
			{
				listener   *l = evs[i].data.ptr;

				if (l->fd >= 0)
					do_accept(l);
				continue;
			}
			else
			{
				conn	   *c = evs[i].data.ptr;

				if (evs[i].events & EPOLLOUT)
				{
					if (!conn_flush(c))
						continue;
					process(c);
					continue;
				}
				if (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
					conn_read(c);
			}
		}
	}
	return 0;
}

/*
 * market-test-psp: a local stand-in for Stripe, Adyen and PayPal.
 *
 * Shared declarations of the program's parts:
 *   util.c    growable buffers, a small JSON parser and writer, a string map
 *   crypto.c  SHA-256 (FIPS 180-4), HMAC-SHA256 (RFC 2104), hex, base64
 *   server.c  main(), the epoll loop, HTTP/1.1 parsing, listeners, timers
 *   psp.c     the three PSP personalities, payments, idempotency, faults,
 *             the ledger and the /_control endpoints
 *
 * The program is single-threaded: every piece of state is touched only from
 * the event loop, so nothing here takes a lock.
 */
#ifndef MARKET_TEST_PSP_H
#define MARKET_TEST_PSP_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* ---- growable byte buffer (util.c) ---- */
typedef struct buf
{
	char	   *p;
	size_t		len;
	size_t		cap;
} buf_t;

void		buf_init(buf_t *b);
void		buf_free(buf_t *b);
void		buf_reserve(buf_t *b, size_t extra);
void		buf_add(buf_t *b, const void *data, size_t n);
void		buf_adds(buf_t *b, const char *s);
void		buf_printf(buf_t *b, const char *fmt,...) __attribute__((format(printf, 2, 3)));
void		buf_json_str(buf_t *b, const char *s, size_t n);
void		buf_json_cstr(buf_t *b, const char *s);
char	   *xstrdup(const char *s);
char	   *xstrndup(const char *s, size_t n);
void	   *xmalloc(size_t n);
void	   *xcalloc(size_t n, size_t m);
void	   *xrealloc(void *p, size_t n);

/* ---- JSON (util.c) ---- */
typedef enum
{
	J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ
} jtype;

typedef struct jval
{
	jtype		t;
	int			b;				/* J_BOOL */
	char	   *s;				/* J_STR: decoded text; J_NUM: the literal */
	size_t		slen;
	size_t		n;				/* J_ARR, J_OBJ: number of members */
	char	  **keys;			/* J_OBJ */
	struct jval **items;		/* J_ARR, J_OBJ */
} jval;

jval	   *json_parse(const char *s, size_t n, char *err, size_t errlen);
void		json_free(jval *v);
jval	   *jget(const jval *obj, const char *key);
const char *jstr(const jval *obj, const char *key);
int			jint(const jval *v, long long *out);
void		json_write(buf_t *b, const jval *v, int sorted);

/* ---- string map (util.c) ---- */
typedef struct map_ent
{
	char	   *key;
	void	   *val;
	struct map_ent *next;
} map_ent;

typedef struct map
{
	map_ent   **b;
	size_t		nb;
	size_t		n;
} map_t;

void		map_init(map_t *m);
void	   *map_get(const map_t *m, const char *key);
void		map_put(map_t *m, const char *key, void *val);
void	   *map_del(map_t *m, const char *key);
void		map_clear(map_t *m, void (*freeval) (void *));

/* ---- crypto (crypto.c) ---- */
typedef struct sha256_ctx
{
	uint32_t	h[8];
	uint64_t	bits;
	uint8_t		blk[64];
	size_t		used;
} sha256_ctx;

void		sha256_init(sha256_ctx *c);
void		sha256_update(sha256_ctx *c, const void *data, size_t n);
void		sha256_final(sha256_ctx *c, uint8_t out[32]);
void		sha256(const void *data, size_t n, uint8_t out[32]);
void		hmac_sha256(const uint8_t *key, size_t klen, const void *msg, size_t mlen,
						uint8_t out[32]);
void		hex_encode(const uint8_t *in, size_t n, char *out);
long		hex_decode(const char *in, size_t n, uint8_t *out);
void		base64_encode(const uint8_t *in, size_t n, buf_t *out);
long		base64_decode(const char *in, size_t n, uint8_t *out);
int			crypto_selftest(FILE *log);

/* ---- HTTP request and response (server.c <-> psp.c) ---- */
#define MAX_HEADERS 64

typedef struct http_req
{
	char		method[12];
	char	   *path;			/* without the query string, NUL-terminated */
	char	   *query;			/* after '?', or "" */
	int			nh;
	char	   *hname[MAX_HEADERS];
	char	   *hval[MAX_HEADERS];
	char	   *body;
	size_t		body_len;
	int			listener;		/* LISTEN_* */
} http_req;

enum
{
	LISTEN_MAIN, LISTEN_CONTROL, LISTEN_STRIPE, LISTEN_ADYEN, LISTEN_PAYPAL, LISTEN_N
};

enum
{
	ACT_SEND,					/* send the response */
	ACT_CLOSE,					/* close the connection without answering */
	ACT_RESET					/* reset the connection (RST) without answering */
};

struct idem;

typedef struct http_resp
{
	int			status;
	int			action;
	long		delay_ms;		/* deliver after this long */
	buf_t		headers;		/* extra header lines, each ending in \r\n */
	buf_t		body;
	struct idem *idem;			/* in flight until delivered, or NULL */
} http_resp;

const char *http_header(const http_req *r, const char *name);
const char *http_reason(int status);

/* psp.c */
void		psp_init(uint64_t seed);
void		psp_handle(http_req *req, http_resp *resp);
void		psp_delivered(struct idem *e);
int			psp_listener_open(int listener);
long		psp_next_deadline_ms(void);
void		psp_tick(void);
void		psp_note_connection(int delta);
void		psp_set_ports(const int ports[LISTEN_N]);
void		psp_set_secrets(const char *stripe_whsec, const char *adyen_hmac_hex);

/* server.c */
long long	now_ms(void);

#endif

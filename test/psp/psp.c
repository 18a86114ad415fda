/*
 * psp.c: the three PSP personalities, their state, idempotency, faults,
 * the ledger and the /_control endpoints of market-test-psp.
 *
 * State (all in memory, reset by POST /_control/reset):
 *   payments    one per PaymentIntent / Adyen payment / PayPal order, with
 *               amounts authorized, captured and refunded in minor units;
 *               captured <= authorized and refunded <= captured always hold
 *   objects     every id the PSPs hand out (charges, authorizations,
 *               captures, refunds, modifications) -> its payment
 *   idempotency (personality, account, key) -> fingerprint of the request
 *               and the stored answer, or "in flight" while the first
 *               answer is still delayed
 *   ledger      every money operation, in order: what tests count
 *   faults      rules set through /_control/faults
 *
 * Called only from the event loop of server.c: no locking.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "psp.h"

enum
{
	K_STRIPE, K_ADYEN, K_PAYPAL, K_N
};
static const char *const kind_name[K_N] = {"stripe", "adyen", "paypal"};

enum
{
	OP_AUTHORIZE, OP_CAPTURE, OP_CANCEL, OP_REFUND, OP_LOOKUP, OP_TOKEN, OP_CREATE, OP_N
};
static const char *const op_name[OP_N] = {
	"authorize", "capture", "cancel", "refund", "lookup", "token", "create"
};

/* ---------------------------------------------------------------- types */

typedef struct payment
{
	int			kind;
	char		id[48];			/* pi_..., Adyen pspReference, PayPal order id */
	char		charge_id[48];	/* Stripe ch_... */
	char		auth_id[48];	/* PayPal authorization id */
	char		account[160];
	char		currency[4];	/* upper case */
	long long	amount;			/* requested */
	long long	authorized;
	long long	captured;
	long long	refunded;
	char		status[40];		/* in the personality's words */
	char		method[160];
	char		reference[200];
	char		idem_key[256];
	char	   *metadata;		/* Stripe metadata as a JSON object */
	char		description[200];
	char		decline_code[48];
	int			declined;
	int			voided;
	int			capture_manual;
	int			final_captured;
	long long	created;		/* unix seconds */
	long		seq;			/* creation order */
} payment;

enum
{
	OB_CHARGE, OB_AUTH, OB_CAPTURE, OB_REFUND, OB_CANCEL
};

typedef struct object
{
	int			type;
	char		id[48];
	payment    *p;
	long long	amount;
	long long	refunded;		/* PayPal captures */
	char		status[32];
	char		reference[200];
	long long	created;
	int			final;			/* PayPal final_capture */
} object;

typedef struct idem
{
	char	   *key;
	uint8_t		fp[32];
	int			in_flight;
	int			orphan;			/* dropped by a reset while in flight */
	int			status;
	char	   *headers;
	char	   *body;
	size_t		body_len;
} idem;

typedef struct ledger_op
{
	long		seq;
	int			kind;
	int			op;
	char		payment[48];
	char		object[48];
	long long	amount;
	char		currency[4];
	char		reference[200];
	char		account[160];
	char		idem_key[256];
	const char *result;			/* succeeded, declined, rejected */
	char		detail[96];
	double		at;				/* unix time */
} ledger_op;

enum
{
	F_LATENCY, F_HOLD, F_DROP, F_RESET, F_ERROR, F_MALFORMED, F_DECLINE, F_DOWN, F_N
};
static const char *const fault_name[F_N] = {
	"latency", "hold", "drop", "reset", "error", "malformed", "decline", "down"
};

typedef struct fault
{
	int			id;
	int			type;
	int			kinds;			/* bit mask of K_* */
	int			op;				/* -1: any */
	char		account[160];	/* "": any */
	long		count;			/* -1: unlimited */
	double		probability;
	long long	expires;		/* now_ms() deadline; 0: never */
	long		ms;
	int			status;
	int			charged;
	int			refuse;			/* down: refuse connections instead of 503 */
	long long	amount,
				min_amount,
				max_amount;		/* -1: unset */
	char		method[160];
	char		code[64];
	long		applied;
	struct fault *next;
} fault;

typedef struct kstats
{
	long		requests;
	long		s2xx,
				s4xx,
				s5xx;
	long		no_answer;		/* closed or reset */
	long		faults;
	long		replays;
	long		conflicts;
	long		mismatches;
	long		declines;
	long		charges;
} kstats;

typedef struct kv
{
	char	   *k;
	char	   *v;
} kv;

/* one request being handled */
typedef struct ctx
{
	http_req   *req;
	http_resp  *resp;
	int			kind;
	int			op;
	char	   *seg[10];
	int			nseg;
	char		account[160];
	const char *idem_key;
	int			store;			/* the outcome is stored for replays */
	payment    *pay;
	kv		   *form;
	int			nform;
	jval	   *json;
} ctx;

/* ---------------------------------------------------------------- state */

static map_t payments;
static map_t objects;
static map_t idems;
static map_t tokens;			/* PayPal access token -> token */
static ledger_op *ledger;
static size_t ledger_n, ledger_cap;
static fault *faults;
static int	next_fault_id = 1;
static kstats stats[K_N];
static long control_requests;
static long conn_open, conn_total;
static long in_flight_n;
static long long started_ms;
static long payment_seq;
static uint64_t rng;
static int	ports[LISTEN_N];
static long paypal_token_ttl = 32400;
static char stripe_whsec[256] = "whsec_test_secret";
static char adyen_hmac_hex[256] =
"44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056";

typedef struct token
{
	char		client_id[160];
	long long	expires_ms;
} token;

/* ---------------------------------------------------------------- small helpers */

static uint64_t
rnd(void)
{
	/* xorshift64* */
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return rng * 2685821657736338717ULL;
}

static double
rnd01(void)
{
	return (double) (rnd() >> 11) / (double) (1ULL << 53);
}

/* prefix followed by n random characters of alphabet */
static void
make_id(char *out, size_t outlen, const char *prefix, int n, const char *alphabet)
{
	size_t		al = strlen(alphabet);
	size_t		pl = strlen(prefix);
	int			i;

	if (pl + (size_t) n + 1 > outlen)
		n = (int) (outlen - pl - 1);
	memcpy(out, prefix, pl);
	for (i = 0; i < n; i++)
		out[pl + (size_t) i] = alphabet[rnd() % al];
	out[pl + (size_t) n] = '\0';
}

static const char ALNUM[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
static const char UPNUM[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/* bounded string copy; always NUL-terminates */
static void
copy(char *dst, size_t n, const char *src)
{
	size_t		l = src ? strlen(src) : 0;

	if (l >= n)
		l = n - 1;
	if (l)
		memcpy(dst, src, l);
	dst[l] = '\0';
}

static long long
unix_now(void)
{
	return (long long) time(NULL);
}

static void
iso_time(char *out, size_t n, long long t)
{
	time_t		tt = (time_t) t;
	struct tm	tm;

	gmtime_r(&tt, &tm);
	strftime(out, n, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* minor-unit exponent of an ISO 4217 currency */
static int
currency_exponent(const char *cur)
{
	static const char *const zero[] = {
		"BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF",
		"UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF", NULL
	};
	static const char *const three[] = {
		"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND", NULL
	};
	int			i;

	for (i = 0; zero[i]; i++)
		if (strcasecmp(cur, zero[i]) == 0)
			return 0;
	for (i = 0; three[i]; i++)
		if (strcasecmp(cur, three[i]) == 0)
			return 3;
	return 2;
}

/* three ASCII letters, upper-cased into out[4]; 0 if not a currency code */
static int
norm_currency(const char *in, char out[4])
{
	int			i;

	if (!in || strlen(in) != 3)
		return 0;
	for (i = 0; i < 3; i++)
	{
		if (!isalpha((unsigned char) in[i]))
			return 0;
		out[i] = (char) toupper((unsigned char) in[i]);
	}
	out[3] = '\0';
	return 1;
}

static void
lower3(const char *in, char out[4])
{
	int			i;

	for (i = 0; i < 3; i++)
		out[i] = (char) tolower((unsigned char) in[i]);
	out[3] = '\0';
}

/* a decimal string amount in minor units into *out; -1 bad syntax, -2 too many decimals */
static int
parse_decimal(const char *s, int exponent, long long *out)
{
	long long	v = 0;
	int			dec = -1;
	const char *p;

	if (!s || !*s)
		return -1;
	for (p = s; *p; p++)
	{
		if (*p == '.')
		{
			if (dec >= 0 || p == s || !p[1])
				return -1;
			dec = 0;
			continue;
		}
		if (!isdigit((unsigned char) *p))
			return -1;
		if (v > 100000000000000LL)
			return -1;
		v = v * 10 + (*p - '0');
		if (dec >= 0)
			dec++;
	}
	if (dec > exponent)
		return -2;
	for (; (dec < 0 ? 0 : dec) < exponent; dec = (dec < 0 ? 1 : dec + 1))
		v *= 10;
	*out = v;
	return 0;
}

/* minor units as a decimal string with the currency's exponent */
static void
format_decimal(char *out, size_t n, long long v, const char *cur)
{
	int			e = currency_exponent(cur);

	if (e == 0)
		snprintf(out, n, "%lld", v);
	else if (e == 2)
		snprintf(out, n, "%lld.%02lld", v / 100, v % 100);
	else
		snprintf(out, n, "%lld.%03lld", v / 1000, v % 1000);
}

/* a non-negative integer in text form; -1 if it is not one */
static long long
parse_uint(const char *s)
{
	long long	v = 0;

	if (!s || !*s || strlen(s) > 15)
		return -1;
	for (; *s; s++)
	{
		if (!isdigit((unsigned char) *s))
			return -1;
		v = v * 10 + (*s - '0');
	}
	return v;
}

/* ---------------------------------------------------------------- decline methods */

typedef struct magic
{
	const char *method;
	const char *decline;		/* NULL: success */
} magic;

/* payment-method references with a fixed outcome, the same at every PSP */
static const magic magics[] = {
	{"pm_card_visa", NULL},
	{"pm_card_visa_debit", NULL},
	{"pm_card_mastercard", NULL},
	{"pm_card_amex", NULL},
	{"pm_card_discover", NULL},
	{"pm_card_chargeDeclined", "generic_decline"},
	{"pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"},
	{"pm_card_chargeDeclinedFraudulent", "fraudulent"},
	{"pm_card_chargeDeclinedLostCard", "lost_card"},
	{"pm_card_chargeDeclinedStolenCard", "stolen_card"},
	{"pm_card_chargeDeclinedExpiredCard", "expired_card"},
	{"pm_card_chargeDeclinedProcessingError", "processing_error"},
	{"pm_card_doNotHonor", "do_not_honor"},
	{"pm_card_tryAgainLater", "try_again_later"},
	{"pm_card_issuerNotAvailable", "issuer_not_available"},
	{NULL, NULL}
};

/* soft declines: worth trying elsewhere or later */
static int
decline_is_soft(const char *code)
{
	return strcmp(code, "insufficient_funds") == 0 || strcmp(code, "do_not_honor") == 0 ||
		strcmp(code, "try_again_later") == 0 || strcmp(code, "issuer_not_available") == 0 ||
		strcmp(code, "processing_error") == 0;
}

static const char *
decline_message(const char *code)
{
	if (strcmp(code, "insufficient_funds") == 0)
		return "Your card has insufficient funds.";
	if (strcmp(code, "expired_card") == 0)
		return "Your card has expired.";
	if (strcmp(code, "processing_error") == 0)
		return "An error occurred while processing your card. Try again in a little bit.";
	if (strcmp(code, "fraudulent") == 0 || strcmp(code, "lost_card") == 0 ||
		strcmp(code, "stolen_card") == 0 || strcmp(code, "generic_decline") == 0)
		return "Your card was declined.";
	return "Your card was declined. Try again later or use another card.";
}

/* ---------------------------------------------------------------- faults */

static int
fault_active(fault *f, long long now)
{
	if (f->expires && now >= f->expires)
		return 0;
	if (f->count == 0)
		return 0;
	return 1;
}

/* does f apply to this request (and win its probability roll)?  consumes one use */
static int
fault_take(fault *f, int kind, int op, const char *account)
{
	if (!fault_active(f, now_ms()))
		return 0;
	if (!(f->kinds & (1 << kind)))
		return 0;
	if (f->op >= 0 && f->op != op)
		return 0;
	if (f->account[0] && strcmp(f->account, account) != 0)
		return 0;
	if (f->probability < 1.0 && rnd01() >= f->probability)
		return 0;
	if (f->count > 0)
		f->count--;
	f->applied++;
	return 1;
}

/* a "down" rule in force for kind (no use consumed), or NULL */
static fault *
down_rule(int kind)
{
	fault	   *f;
	long long	now = now_ms();

	for (f = faults; f; f = f->next)
		if (f->type == F_DOWN && fault_active(f, now) && (f->kinds & (1 << kind)))
			return f;
	return NULL;
}

/* should listener l be open? */
int
psp_listener_open(int l)
{
	fault	   *f;
	long long	now = now_ms();

	if (l == LISTEN_CONTROL)
		return 1;
	for (f = faults; f; f = f->next)
	{
		if (f->type != F_DOWN || !f->refuse || !fault_active(f, now))
			continue;
		if (l == LISTEN_MAIN && f->kinds == (1 << K_N) - 1)
			return 0;
		if (l == LISTEN_STRIPE && (f->kinds & (1 << K_STRIPE)))
			return 0;
		if (l == LISTEN_ADYEN && (f->kinds & (1 << K_ADYEN)))
			return 0;
		if (l == LISTEN_PAYPAL && (f->kinds & (1 << K_PAYPAL)))
			return 0;
	}
	return 1;
}

/* the next moment a fault expires (for the loop's timeout), or -1 */
long
psp_next_deadline_ms(void)
{
	fault	   *f;
	long long	best = -1;

	for (f = faults; f; f = f->next)
		if (f->expires && (best < 0 || f->expires < best))
			best = f->expires;
	return (long) best;
}

/* drop expired and used-up fault rules */
void
psp_tick(void)
{
	fault	  **pp = &faults;
	long long	now = now_ms();

	while (*pp)
	{
		fault	   *f = *pp;

		if (!fault_active(f, now))
		{
			*pp = f->next;
			free(f);
		}
		else
			pp = &f->next;
	}
}

/* ---------------------------------------------------------------- ledger */

static void
ledger_add(ctx *c, int op, payment *p, const char *objid, long long amount,
		   const char *result, const char *detail)
{
	ledger_op  *l;
	struct timespec ts;

	if (ledger_n == ledger_cap)
	{
		ledger_cap = ledger_cap ? ledger_cap * 2 : 1024;
		ledger = xrealloc(ledger, ledger_cap * sizeof(ledger_op));
	}
	l = &ledger[ledger_n];
	memset(l, 0, sizeof(*l));
	l->seq = (long) ++ledger_n;
	l->kind = c->kind;
	l->op = op;
	copy(l->payment, sizeof(l->payment), p ? p->id : "");
	copy(l->object, sizeof(l->object), objid);
	l->amount = amount;
	copy(l->currency, sizeof(l->currency), p ? p->currency : "");
	copy(l->reference, sizeof(l->reference), p ? p->reference : "");
	copy(l->account, sizeof(l->account), c->account);
	copy(l->idem_key, sizeof(l->idem_key), c->idem_key);
	l->result = result;
	copy(l->detail, sizeof(l->detail), detail);
	clock_gettime(CLOCK_REALTIME, &ts);
	l->at = (double) ts.tv_sec + ts.tv_nsec / 1e9;
	if (strcmp(result, "succeeded") == 0 && op == OP_AUTHORIZE)
		stats[c->kind].charges++;
	if (strcmp(result, "declined") == 0)
		stats[c->kind].declines++;
}

/* uniform state of a payment, whatever the PSP */
static const char *
payment_state(const payment *p)
{
	if (p->declined)
		return "declined";
	if (p->authorized == 0)
		return "created";
	if (p->refunded > 0)
		return p->refunded == p->captured ? "refunded" : "partially_refunded";
	if (p->captured > 0)
		return (p->captured == p->authorized || p->final_captured) ? "captured" :
			(p->voided ? "captured" : "partially_captured");
	if (p->voided)
		return "voided";
	return "authorized";
}

/* ---------------------------------------------------------------- payments and objects */

static payment *
payment_new(ctx *c, const char *id)
{
	payment    *p = xcalloc(1, sizeof(payment));

	p->kind = c->kind;
	copy(p->id, sizeof(p->id), id);
	copy(p->account, sizeof(p->account), c->account);
	copy(p->idem_key, sizeof(p->idem_key), c->idem_key);
	p->created = unix_now();
	p->seq = ++payment_seq;
	p->metadata = xstrdup("{}");
	map_put(&payments, p->id, p);
	return p;
}

static void
payment_free(void *v)
{
	payment    *p = v;

	free(p->metadata);
	free(p);
}

static object *
object_new(int type, const char *id, payment *p, long long amount, const char *status)
{
	object	   *o = xcalloc(1, sizeof(object));

	o->type = type;
	copy(o->id, sizeof(o->id), id);
	o->p = p;
	o->amount = amount;
	copy(o->status, sizeof(o->status), status);
	o->created = unix_now();
	map_put(&objects, o->id, o);
	return o;
}

/* a payment of this personality and account by id, or NULL */
static payment *
find_payment(ctx *c, const char *id)
{
	payment    *p = map_get(&payments, id);

	if (!p || p->kind != c->kind)
		return NULL;
	return p;
}

static object *
find_object(ctx *c, const char *id, int type)
{
	object	   *o = map_get(&objects, id);

	if (!o || o->type != type || o->p->kind != c->kind)
		return NULL;
	return o;
}

/* ---------------------------------------------------------------- responses */

static void
set_json(ctx *c, int status)
{
	c->resp->status = status;
	c->resp->action = ACT_SEND;
}

static void
add_header(ctx *c, const char *name, const char *value)
{
	buf_printf(&c->resp->headers, "%s: %s\r\n", name, value);
}

static void
stripe_error(ctx *c, int status, const char *type, const char *code,
			 const char *decline_code, const char *param, const char *message)
{
	buf_t	   *b = &c->resp->body;

	set_json(c, status);
	buf_adds(b, "{\"error\":{");
	if (code)
	{
		buf_adds(b, "\"code\":");
		buf_json_cstr(b, code);
		buf_adds(b, ",");
	}
	if (decline_code)
	{
		buf_adds(b, "\"decline_code\":");
		buf_json_cstr(b, decline_code);
		buf_adds(b, ",");
	}
	if (code)
		buf_printf(b, "\"doc_url\":\"https://stripe.com/docs/error-codes/%s\",", code);
	buf_adds(b, "\"message\":");
	buf_json_cstr(b, message);
	if (param)
	{
		buf_adds(b, ",\"param\":");
		buf_json_cstr(b, param);
	}
	buf_adds(b, ",\"type\":");
	buf_json_cstr(b, type);
	buf_adds(b, "}}");
}

static void
adyen_error(ctx *c, int status, const char *code, const char *message, const char *type)
{
	char		psp[20];

	make_id(psp, sizeof(psp), "", 16, UPNUM);
	set_json(c, status);
	buf_printf(&c->resp->body, "{\"status\":%d,\"errorCode\":", status);
	buf_json_cstr(&c->resp->body, code);
	buf_adds(&c->resp->body, ",\"message\":");
	buf_json_cstr(&c->resp->body, message);
	buf_adds(&c->resp->body, ",\"errorType\":");
	buf_json_cstr(&c->resp->body, type);
	buf_printf(&c->resp->body, ",\"pspReference\":\"%s\"}", psp);
}

static void
paypal_error(ctx *c, int status, const char *name, const char *message,
			 const char *issue, const char *field, const char *description)
{
	char		dbg[16];
	buf_t	   *b = &c->resp->body;

	make_id(dbg, sizeof(dbg), "", 13, "0123456789abcdef");
	set_json(c, status);
	buf_adds(b, "{\"name\":");
	buf_json_cstr(b, name);
	buf_adds(b, ",\"message\":");
	buf_json_cstr(b, message);
	buf_printf(b, ",\"debug_id\":\"%s\"", dbg);
	if (issue)
	{
		buf_adds(b, ",\"details\":[{");
		if (field)
		{
			buf_adds(b, "\"field\":");
			buf_json_cstr(b, field);
			buf_adds(b, ",\"location\":\"body\",");
		}
		buf_adds(b, "\"issue\":");
		buf_json_cstr(b, issue);
		if (description)
		{
			buf_adds(b, ",\"description\":");
			buf_json_cstr(b, description);
		}
		buf_adds(b, "}]");
	}
	buf_printf(b, ",\"links\":[{\"href\":\"https://developer.paypal.com/docs/api/orders/v2/#error-%s\",\"rel\":\"information_link\",\"method\":\"GET\"}]}",
			   issue ? issue : name);
}

#define PP_UNPROCESSABLE "The requested action could not be performed, semantically incorrect, or failed business validation."
#define PP_INVALID_REQUEST "Request is not well-formed, syntactically incorrect, or violates schema."

static void
pp_422(ctx *c, const char *issue, const char *description)
{
	paypal_error(c, 422, "UNPROCESSABLE_ENTITY", PP_UNPROCESSABLE, issue, NULL, description);
}

static void
pp_400(ctx *c, const char *issue, const char *field, const char *description)
{
	paypal_error(c, 400, "INVALID_REQUEST", PP_INVALID_REQUEST, issue, field, description);
}

static void
pp_404(ctx *c, const char *description)
{
	paypal_error(c, 404, "RESOURCE_NOT_FOUND",
				 "The specified resource does not exist.", "INVALID_RESOURCE_ID", NULL,
				 description);
}

/* the personality's answer to an injected 5xx or an outage */
static void
server_error(ctx *c, int status)
{
	switch (c->kind)
	{
		case K_STRIPE:
			stripe_error(c, status, "api_error", NULL, NULL, NULL,
						 "An unknown error occurred (market-test-psp injected fault).");
			break;
		case K_ADYEN:
			adyen_error(c, status, "000", status == 503 ? "Service Unavailable" :
						"Internal error (market-test-psp injected fault)", "internal");
			break;
		default:
			if (status == 503)
				paypal_error(c, 503, "SERVICE_UNAVAILABLE",
							 "Service Unavailable (market-test-psp injected fault).", NULL, NULL, NULL);
			else
				paypal_error(c, status, "INTERNAL_SERVER_ERROR",
							 "An internal server error has occurred (market-test-psp injected fault).",
							 NULL, NULL, NULL);
			break;
	}
}

/* ---------------------------------------------------------------- request bodies */

static char *
url_decode(const char *s, size_t n)
{
	char	   *out = xmalloc(n + 1);
	size_t		i,
				j = 0;

	for (i = 0; i < n; i++)
	{
		if (s[i] == '+')
			out[j++] = ' ';
		else if (s[i] == '%' && i + 2 < n + 0 && isxdigit((unsigned char) s[i + 1]) &&
				 isxdigit((unsigned char) s[i + 2]))
		{
			char		h[3] = {s[i + 1], s[i + 2], 0};

			out[j++] = (char) strtol(h, NULL, 16);
			i += 2;
		}
		else
			out[j++] = s[i];
	}
	out[j] = '\0';
	return out;
}

/* parse application/x-www-form-urlencoded */
static void
parse_form(ctx *c, const char *s, size_t n)
{
	size_t		i = 0;
	int			cap = 0;

	while (i < n)
	{
		size_t		j = i;
		const char *eq;
		size_t		klen;

		while (j < n && s[j] != '&')
			j++;
		if (j > i)
		{
			eq = memchr(s + i, '=', j - i);
			klen = eq ? (size_t) (eq - (s + i)) : j - i;
			if (c->nform == cap)
			{
				cap = cap ? cap * 2 : 16;
				c->form = xrealloc(c->form, (size_t) cap * sizeof(kv));
			}
			c->form[c->nform].k = url_decode(s + i, klen);
			c->form[c->nform].v = eq ? url_decode(eq + 1, (size_t) (s + j - eq - 1)) : xstrdup("");
			c->nform++;
		}
		i = j + 1;
	}
}

static const char *
fget(ctx *c, const char *k)
{
	int			i;

	for (i = c->nform - 1; i >= 0; i--)
		if (strcmp(c->form[i].k, k) == 0)
			return c->form[i].v;
	return NULL;
}

static int
kvcmp(const void *a, const void *b)
{
	const kv   *x = a;
	const kv   *y = b;
	int			r = strcmp(x->k, y->k);

	return r ? r : strcmp(x->v, y->v);
}

/* SHA-256 of method, path and the parameters in a canonical order */
static void
fingerprint(ctx *c, uint8_t out[32])
{
	sha256_ctx	h;
	buf_t		b;

	sha256_init(&h);
	sha256_update(&h, c->req->method, strlen(c->req->method));
	sha256_update(&h, " ", 1);
	sha256_update(&h, c->req->path, strlen(c->req->path));
	sha256_update(&h, "\n", 1);
	buf_init(&b);
	if (c->kind == K_STRIPE)
	{
		kv		   *sorted = xmalloc((size_t) (c->nform ? c->nform : 1) * sizeof(kv));
		int			i;

		memcpy(sorted, c->form, (size_t) c->nform * sizeof(kv));
		qsort(sorted, (size_t) c->nform, sizeof(kv), kvcmp);
		for (i = 0; i < c->nform; i++)
			buf_printf(&b, "%s=%s\n", sorted[i].k, sorted[i].v);
		free(sorted);
	}
	else if (c->json)
		json_write(&b, c->json, 1);
	if (b.len)
		sha256_update(&h, b.p, b.len);
	buf_free(&b);
	sha256_final(&h, out);
}

/* ---------------------------------------------------------------- Stripe */

/* a PaymentIntent as Stripe shows it */
static void
stripe_pi_json(buf_t *b, const payment *p)
{
	char		cur[4];
	long long	capturable = strcmp(p->status, "requires_capture") == 0 ?
		p->authorized - p->captured : 0;

	lower3(p->currency, cur);
	buf_printf(b, "{\"id\":\"%s\",\"object\":\"payment_intent\",\"amount\":%lld,"
			   "\"amount_capturable\":%lld,\"amount_received\":%lld,"
			   "\"capture_method\":\"%s\",\"client_secret\":\"%s_secret_test\","
			   "\"confirmation_method\":\"automatic\",\"created\":%lld,\"currency\":\"%s\",",
			   p->id, p->amount, capturable, p->captured,
			   p->capture_manual ? "manual" : "automatic", p->id, p->created, cur);
	buf_adds(b, "\"description\":");
	buf_json_cstr(b, p->description[0] ? p->description : NULL);
	buf_adds(b, ",\"last_payment_error\":");
	if (p->declined)
	{
		buf_printf(b, "{\"code\":\"%s\",\"decline_code\":\"%s\",\"message\":",
				   strcmp(p->decline_code, "expired_card") == 0 ? "expired_card" :
				   strcmp(p->decline_code, "processing_error") == 0 ? "processing_error" :
				   "card_declined", p->decline_code);
		buf_json_cstr(b, decline_message(p->decline_code));
		buf_adds(b, ",\"type\":\"card_error\"}");
	}
	else
		buf_adds(b, "null");
	buf_adds(b, ",\"latest_charge\":");
	buf_json_cstr(b, p->charge_id[0] ? p->charge_id : NULL);
	buf_printf(b, ",\"livemode\":false,\"metadata\":%s,\"payment_method\":",
			   p->metadata);
	buf_json_cstr(b, p->method[0] ? p->method : NULL);
	buf_adds(b, ",\"payment_method_types\":[\"card\"],\"status\":");
	buf_json_cstr(b, p->status);
	buf_adds(b, "}");
}

static void
stripe_send_pi(ctx *c, int status, const payment *p)
{
	set_json(c, status);
	stripe_pi_json(&c->resp->body, p);
}

/* integer parameter; 1 ok, 0 absent, -1 invalid (error answered) */
static int
stripe_int_param(ctx *c, const char *name, long long *out)
{
	const char *v = fget(c, name);
	char		msg[300];

	if (!v)
		return 0;
	*out = parse_uint(v);
	if (*out < 0)
	{
		snprintf(msg, sizeof(msg), "Invalid integer: %.200s", v);
		stripe_error(c, 400, "invalid_request_error", "parameter_invalid_integer", NULL, name, msg);
		return -1;
	}
	return 1;
}

/* a matching decline rule for this authorization, or NULL */
static const char *
injected_decline(ctx *c, long long amount, const char *method)
{
	fault	   *f;

	for (f = faults; f; f = f->next)
	{
		if (f->type != F_DECLINE)
			continue;
		if (f->amount >= 0 && f->amount != amount)
			continue;
		if (f->min_amount >= 0 && amount < f->min_amount)
			continue;
		if (f->max_amount >= 0 && amount > f->max_amount)
			continue;
		if (f->method[0] && strcmp(f->method, method) != 0)
			continue;
		if (fault_take(f, c->kind, OP_AUTHORIZE, c->account))
		{
			stats[c->kind].faults++;
			return f->code[0] ? f->code : "generic_decline";
		}
	}
	return NULL;
}

/* outcome of an authorization: NULL (approved) or a decline code */
static const char *
authorize_outcome(ctx *c, long long amount, const char *method, const char *holder)
{
	const char *d = injected_decline(c, amount, method);
	int			i;

	if (d)
		return d;
	for (i = 0; magics[i].method; i++)
		if (strcmp(magics[i].method, method) == 0)
			return magics[i].decline;
	if (holder)
	{
		/* Adyen's test convention: the holder name names the refusal */
		static const char *const hn[][2] = {
			{"DECLINED", "generic_decline"}, {"NOT_ENOUGH_BALANCE", "insufficient_funds"},
			{"BLOCK_CARD", "lost_card"}, {"CARD_EXPIRED", "expired_card"},
			{"ISSUER_UNAVAILABLE", "issuer_not_available"}, {"FRAUD", "fraudulent"},
			{"ERROR", "processing_error"}, {"DECLINED_NON_GENERIC", "do_not_honor"},
			{NULL, NULL}
		};

		for (i = 0; hn[i][0]; i++)
			if (strcmp(hn[i][0], holder) == 0)
				return hn[i][1];
	}
	return NULL;
}

/* confirm a PaymentIntent (create with confirm=true, or /confirm) */
static void
stripe_confirm(ctx *c, payment *p)
{
	const char *d = authorize_outcome(c, p->amount, p->method, NULL);

	make_id(p->charge_id, sizeof(p->charge_id), "ch_3", 24, ALNUM);
	object_new(OB_CHARGE, p->charge_id, p, p->amount, d ? "failed" : "succeeded");
	c->store = 1;
	if (d)
	{
		buf_t	   *b = &c->resp->body;
		const char *code = strcmp(d, "expired_card") == 0 ? "expired_card" :
			strcmp(d, "processing_error") == 0 ? "processing_error" : "card_declined";

		p->declined = 1;
		copy(p->decline_code, sizeof(p->decline_code), d);
		copy(p->status, sizeof(p->status), "requires_payment_method");
		ledger_add(c, OP_AUTHORIZE, p, p->charge_id, p->amount, "declined", d);
		set_json(c, 402);
		buf_printf(b, "{\"error\":{\"charge\":\"%s\",\"code\":\"%s\",\"decline_code\":\"%s\","
				   "\"doc_url\":\"https://stripe.com/docs/error-codes/%s\",\"message\":",
				   p->charge_id, code, d, code);
		buf_json_cstr(b, decline_message(d));
		buf_adds(b, ",\"payment_intent\":");
		stripe_pi_json(b, p);
		buf_adds(b, ",\"payment_method\":{\"id\":");
		buf_json_cstr(b, p->method);
		buf_adds(b, ",\"object\":\"payment_method\",\"type\":\"card\"},\"type\":\"card_error\"}}");
		return;
	}
	p->declined = 0;
	p->decline_code[0] = '\0';
	p->authorized = p->amount;
	if (p->capture_manual)
		copy(p->status, sizeof(p->status), "requires_capture");
	else
	{
		p->captured = p->amount;
		p->final_captured = 1;
		copy(p->status, sizeof(p->status), "succeeded");
	}
	ledger_add(c, OP_AUTHORIZE, p, p->charge_id, p->amount, "succeeded",
			   p->capture_manual ? "manual capture" : "automatic capture");
	if (!p->capture_manual)
		ledger_add(c, OP_CAPTURE, p, p->charge_id, p->amount, "succeeded", "automatic capture");
	stripe_send_pi(c, 200, p);
}

static void
stripe_create(ctx *c)
{
	long long	amount;
	const char *cur = fget(c, "currency");
	const char *pm = fget(c, "payment_method");
	const char *cm = fget(c, "capture_method");
	const char *confirm = fget(c, "confirm");
	char		ucur[4];
	char		id[40];
	payment    *p;
	buf_t		meta;
	int			i,
				r,
				nmeta = 0;

	r = stripe_int_param(c, "amount", &amount);
	if (r < 0)
		return;
	if (r == 0)
	{
		stripe_error(c, 400, "invalid_request_error", "parameter_missing", NULL, "amount",
					 "Missing required param: amount.");
		return;
	}
	if (amount < 1)
	{
		stripe_error(c, 400, "invalid_request_error", "amount_too_small", NULL, "amount",
					 "Amount must be at least 1 minor unit.");
		return;
	}
	if (amount > 99999999)
	{
		stripe_error(c, 400, "invalid_request_error", "amount_too_large", NULL, "amount",
					 "Amount must be no more than 99999999.");
		return;
	}
	if (!cur)
	{
		stripe_error(c, 400, "invalid_request_error", "parameter_missing", NULL, "currency",
					 "Missing required param: currency.");
		return;
	}
	if (!norm_currency(cur, ucur))
	{
		char		msg[200];

		snprintf(msg, sizeof(msg), "Invalid currency: %.100s.", cur);
		stripe_error(c, 400, "invalid_request_error", "parameter_invalid_string", NULL, "currency", msg);
		return;
	}
	if (cm && strcmp(cm, "manual") != 0 && strcmp(cm, "automatic") != 0 &&
		strcmp(cm, "automatic_async") != 0)
	{
		stripe_error(c, 400, "invalid_request_error", "parameter_invalid_string", NULL,
					 "capture_method", "Invalid capture_method: must be one of automatic, automatic_async, or manual.");
		return;
	}
	if (confirm && strcmp(confirm, "true") != 0 && strcmp(confirm, "false") != 0)
	{
		stripe_error(c, 400, "invalid_request_error", "parameter_invalid_boolean", NULL, "confirm",
					 "Invalid boolean: must be true or false.");
		return;
	}
	if (pm && strncmp(pm, "pm_", 3) != 0)
	{
		char		msg[300];

		snprintf(msg, sizeof(msg), "No such PaymentMethod: '%.200s'", pm);
		stripe_error(c, 400, "invalid_request_error", "resource_missing", NULL, "payment_method", msg);
		return;
	}
	if (confirm && strcmp(confirm, "true") == 0 && !pm)
	{
		stripe_error(c, 400, "invalid_request_error", "parameter_missing", NULL, "payment_method",
					 "You cannot confirm this PaymentIntent because it's missing a payment method.");
		return;
	}

	make_id(id, sizeof(id), "pi_3", 24, ALNUM);
	p = payment_new(c, id);
	c->pay = p;
	p->amount = amount;
	memcpy(p->currency, ucur, 4);
	copy(p->method, sizeof(p->method), pm);
	p->capture_manual = cm && strcmp(cm, "manual") == 0;
	copy(p->description, sizeof(p->description), fget(c, "description"));
	buf_init(&meta);
	buf_adds(&meta, "{");
	for (i = 0; i < c->nform; i++)
	{
		size_t		kl = strlen(c->form[i].k);

		if (kl > 10 && strncmp(c->form[i].k, "metadata[", 9) == 0 && c->form[i].k[kl - 1] == ']')
		{
			if (nmeta++)
				buf_adds(&meta, ",");
			buf_json_str(&meta, c->form[i].k + 9, kl - 10);
			buf_adds(&meta, ":");
			buf_json_cstr(&meta, c->form[i].v);
		}
	}
	buf_adds(&meta, "}");
	free(p->metadata);
	p->metadata = meta.p;
	{
		static const char *const refkeys[] = {"payment_id", "reference", "order_id", NULL};

		for (i = 0; refkeys[i] && !p->reference[0]; i++)
		{
			char		k[40];

			snprintf(k, sizeof(k), "metadata[%s]", refkeys[i]);
			copy(p->reference, sizeof(p->reference), fget(c, k));
		}
		if (!p->reference[0])
			copy(p->reference, sizeof(p->reference), p->description);
	}
	copy(p->status, sizeof(p->status), pm ? "requires_confirmation" : "requires_payment_method");
	if (confirm && strcmp(confirm, "true") == 0)
	{
		stripe_confirm(c, p);
		return;
	}
	ledger_add(c, OP_CREATE, p, "", amount, "succeeded", "not confirmed");
	c->store = 1;
	stripe_send_pi(c, 200, p);
}

static void
stripe_missing_pi(ctx *c, const char *id)
{
	char		msg[200];

	snprintf(msg, sizeof(msg), "No such payment_intent: '%.100s'", id);
	stripe_error(c, 404, "invalid_request_error", "resource_missing", NULL, "intent", msg);
}

static void
stripe_unexpected_state(ctx *c, payment *p, const char *action, const char *allowed)
{
	char		msg[400];

	snprintf(msg, sizeof(msg),
			 "This PaymentIntent could not be %s because it has a status of %s. "
			 "Only a PaymentIntent with one of the following statuses may be acted upon: %s.",
			 action, p->status, allowed);
	stripe_error(c, 400, "invalid_request_error", "payment_intent_unexpected_state", NULL, NULL, msg);
}

static void
stripe_pi_action(ctx *c)
{
	payment    *p = find_payment(c, c->seg[3]);
	const char *action = c->seg[4];

	if (!p)
	{
		stripe_missing_pi(c, c->seg[3]);
		return;
	}
	c->pay = p;
	if (strcmp(action, "confirm") == 0)
	{
		const char *pm = fget(c, "payment_method");

		if (strcmp(p->status, "requires_confirmation") != 0 &&
			strcmp(p->status, "requires_payment_method") != 0)
		{
			stripe_unexpected_state(c, p, "confirmed", "requires_payment_method, requires_confirmation");
			return;
		}
		if (pm)
		{
			if (strncmp(pm, "pm_", 3) != 0)
			{
				stripe_error(c, 400, "invalid_request_error", "resource_missing", NULL,
							 "payment_method", "No such PaymentMethod.");
				return;
			}
			copy(p->method, sizeof(p->method), pm);
		}
		if (!p->method[0])
		{
			stripe_error(c, 400, "invalid_request_error", "parameter_missing", NULL, "payment_method",
						 "You cannot confirm this PaymentIntent because it's missing a payment method.");
			return;
		}
		stripe_confirm(c, p);
		return;
	}
	if (strcmp(action, "capture") == 0)
	{
		long long	amt;
		long long	capturable;
		const char *fc = fget(c, "final_capture");
		int			r;
		int			final = !(fc && strcmp(fc, "false") == 0);

		if (strcmp(p->status, "requires_capture") != 0)
		{
			stripe_unexpected_state(c, p, "captured", "requires_capture");
			ledger_add(c, OP_CAPTURE, p, "", 0, "rejected", "unexpected state");
			return;
		}
		capturable = p->authorized - p->captured;
		r = stripe_int_param(c, "amount_to_capture", &amt);
		if (r < 0)
			return;
		if (r == 0)
			amt = capturable;
		if (amt < 1)
		{
			stripe_error(c, 400, "invalid_request_error", "amount_too_small", NULL,
						 "amount_to_capture", "The amount to capture must be at least 1 minor unit.");
			return;
		}
		if (amt > capturable)
		{
			char		msg[200];

			snprintf(msg, sizeof(msg),
					 "The amount to capture (%lld) must be less than or equal to the amount capturable (%lld).",
					 amt, capturable);
			stripe_error(c, 400, "invalid_request_error", "amount_too_large", NULL,
						 "amount_to_capture", msg);
			ledger_add(c, OP_CAPTURE, p, "", amt, "rejected", "amount_too_large");
			return;
		}
		p->captured += amt;
		if (final || p->captured == p->authorized)
		{
			p->final_captured = 1;
			copy(p->status, sizeof(p->status), "succeeded");
		}
		ledger_add(c, OP_CAPTURE, p, p->charge_id, amt, "succeeded", final ? "final" : "not final");
		c->store = 1;
		stripe_send_pi(c, 200, p);
		return;
	}
	if (strcmp(action, "cancel") == 0)
	{
		if (strcmp(p->status, "requires_capture") != 0 &&
			strcmp(p->status, "requires_payment_method") != 0 &&
			strcmp(p->status, "requires_confirmation") != 0 &&
			strcmp(p->status, "requires_action") != 0)
		{
			stripe_unexpected_state(c, p, "canceled",
									"requires_payment_method, requires_capture, requires_confirmation, requires_action, processing");
			ledger_add(c, OP_CANCEL, p, "", 0, "rejected", "unexpected state");
			return;
		}
		p->voided = 1;
		ledger_add(c, OP_CANCEL, p, "", p->authorized - p->captured, "succeeded",
				   fget(c, "cancellation_reason") ? fget(c, "cancellation_reason") : "");
		copy(p->status, sizeof(p->status), p->captured > 0 ? "succeeded" : "canceled");
		c->store = 1;
		stripe_send_pi(c, 200, p);
		return;
	}
	stripe_error(c, 404, "invalid_request_error", NULL, NULL, NULL, "Unrecognized request URL.");
}

static void
stripe_refund_json(buf_t *b, const object *o)
{
	char		cur[4];

	lower3(o->p->currency, cur);
	buf_printf(b, "{\"id\":\"%s\",\"object\":\"refund\",\"amount\":%lld,\"charge\":\"%s\","
			   "\"created\":%lld,\"currency\":\"%s\",\"metadata\":{},\"payment_intent\":\"%s\","
			   "\"reason\":null,\"status\":\"%s\"}",
			   o->id, o->amount, o->p->charge_id, o->created, cur, o->p->id, o->status);
}

static void
stripe_refund(ctx *c)
{
	const char *pi = fget(c, "payment_intent");
	const char *ch = fget(c, "charge");
	payment    *p = NULL;
	long long	amt;
	long long	left;
	int			r;
	char		id[40];
	object	   *o;

	if (!pi && !ch)
	{
		stripe_error(c, 400, "invalid_request_error", "parameter_missing", NULL, "payment_intent",
					 "One of the following params should be provided for this request: payment_intent or charge.");
		return;
	}
	if (pi)
		p = find_payment(c, pi);
	else
	{
		object	   *chg = find_object(c, ch, OB_CHARGE);

		p = chg ? chg->p : NULL;
	}
	if (!p)
	{
		char		msg[200];

		snprintf(msg, sizeof(msg), "No such %s: '%.100s'", pi ? "payment_intent" : "charge", pi ? pi : ch);
		stripe_error(c, 400, "invalid_request_error", "resource_missing", NULL,
					 pi ? "payment_intent" : "charge", msg);
		return;
	}
	c->pay = p;
	if (p->captured == 0)
	{
		stripe_error(c, 400, "invalid_request_error", "charge_not_refundable", NULL, NULL,
					 "This PaymentIntent does not have a successful charge to refund.");
		ledger_add(c, OP_REFUND, p, "", 0, "rejected", "nothing captured");
		return;
	}
	left = p->captured - p->refunded;
	r = stripe_int_param(c, "amount", &amt);
	if (r < 0)
		return;
	if (r == 0)
		amt = left;
	if (left == 0)
	{
		char		msg[200];

		snprintf(msg, sizeof(msg), "Charge %s has already been refunded.", p->charge_id);
		stripe_error(c, 400, "invalid_request_error", "charge_already_refunded", NULL, NULL, msg);
		ledger_add(c, OP_REFUND, p, "", amt, "rejected", "charge_already_refunded");
		return;
	}
	if (amt < 1)
	{
		stripe_error(c, 400, "invalid_request_error", "amount_too_small", NULL, "amount",
					 "Refund amount must be at least 1 minor unit.");
		return;
	}
	if (amt > left)
	{
		char		msg[200];

		snprintf(msg, sizeof(msg),
				 "Refund amount (%lld) is greater than unrefunded amount on charge (%lld)", amt, left);
		stripe_error(c, 400, "invalid_request_error", "amount_too_large", NULL, "amount", msg);
		ledger_add(c, OP_REFUND, p, "", amt, "rejected", "amount_too_large");
		return;
	}
	make_id(id, sizeof(id), "re_3", 24, ALNUM);
	o = object_new(OB_REFUND, id, p, amt, "succeeded");
	p->refunded += amt;
	ledger_add(c, OP_REFUND, p, id, amt, "succeeded", "");
	c->store = 1;
	set_json(c, 200);
	stripe_refund_json(&c->resp->body, o);
}

/* GET /v1/payment_intents/search?query=metadata['k']:'v' */
static void
stripe_search(ctx *c)
{
	const char *q = c->req->query;
	char	   *query = NULL;
	char		key[128],
				val[256];
	int			n = 0;
	size_t		i;
	buf_t	   *b = &c->resp->body;

	while (q && *q)
	{
		const char *amp = strchr(q, '&');
		size_t		len = amp ? (size_t) (amp - q) : strlen(q);

		if (len > 6 && strncmp(q, "query=", 6) == 0)
			query = url_decode(q + 6, len - 6);
		q = amp ? amp + 1 : NULL;
	}
	if (!query || sscanf(query, "metadata['%127[^']']:'%255[^']'", key, val) != 2)
	{
		free(query);
		stripe_error(c, 400, "invalid_request_error", "parameter_invalid_string", NULL, "query",
					 "market-test-psp supports only query=metadata['key']:'value'.");
		return;
	}
	free(query);
	set_json(c, 200);
	buf_adds(b, "{\"object\":\"search_result\",\"data\":[");
	for (i = 0; i < payments.nb; i++)
	{
		map_ent    *e;

		for (e = payments.b[i]; e; e = e->next)
		{
			payment    *p = e->val;
			jval	   *m;
			const char *v;

			if (p->kind != K_STRIPE || strcmp(p->account, c->account) != 0)
				continue;
			m = json_parse(p->metadata, strlen(p->metadata), NULL, 0);
			v = jstr(m, key);
			if (v && strcmp(v, val) == 0)
			{
				if (n++)
					buf_adds(b, ",");
				stripe_pi_json(b, p);
			}
			json_free(m);
		}
	}
	buf_adds(b, "],\"has_more\":false,\"next_page\":null,\"url\":\"/v1/payment_intents/search\"}");
}

static void
stripe_route(ctx *c)
{
	const char *m = c->req->method;
	int			post = strcmp(m, "POST") == 0;
	int			get = strcmp(m, "GET") == 0;

	if (c->nseg == 2 && strcmp(c->seg[1], "payment_intents") == 0 && post)
	{
		const char *confirm = fget(c, "confirm");

		c->op = (confirm && strcmp(confirm, "true") == 0) ? OP_AUTHORIZE : OP_CREATE;
		return;
	}
	if (c->nseg == 3 && strcmp(c->seg[1], "payment_intents") == 0 && get)
	{
		c->op = OP_LOOKUP;
		return;
	}
	if (c->nseg == 4 && strcmp(c->seg[1], "payment_intents") == 0 && post)
	{
		if (strcmp(c->seg[3], "capture") == 0)
			c->op = OP_CAPTURE;
		else if (strcmp(c->seg[3], "cancel") == 0)
			c->op = OP_CANCEL;
		else if (strcmp(c->seg[3], "confirm") == 0)
			c->op = OP_AUTHORIZE;
		return;
	}
	if (c->nseg == 2 && strcmp(c->seg[1], "refunds") == 0 && post)
	{
		c->op = OP_REFUND;
		return;
	}
	if (c->nseg == 3 && strcmp(c->seg[1], "refunds") == 0 && get)
		c->op = OP_LOOKUP;
}

static void
stripe_execute(ctx *c)
{
	const char *m = c->req->method;

	if (strcmp(m, "POST") == 0 && c->nseg == 2 && strcmp(c->seg[1], "payment_intents") == 0)
		stripe_create(c);
	else if (strcmp(m, "GET") == 0 && c->nseg == 3 && strcmp(c->seg[1], "payment_intents") == 0 &&
			 strcmp(c->seg[2], "search") == 0)
		stripe_search(c);
	else if (strcmp(m, "GET") == 0 && c->nseg == 3 && strcmp(c->seg[1], "payment_intents") == 0)
	{
		payment    *p = find_payment(c, c->seg[2]);

		if (!p)
			stripe_missing_pi(c, c->seg[2]);
		else
			stripe_send_pi(c, 200, p);
	}
	else if (strcmp(m, "POST") == 0 && c->nseg == 4 && strcmp(c->seg[1], "payment_intents") == 0)
	{
		/* seg[3] is the action: shift so stripe_pi_action sees id in [3] */
		c->seg[4] = c->seg[3];
		c->seg[3] = c->seg[2];
		stripe_pi_action(c);
	}
	else if (strcmp(m, "POST") == 0 && c->nseg == 2 && strcmp(c->seg[1], "refunds") == 0)
		stripe_refund(c);
	else if (strcmp(m, "GET") == 0 && c->nseg == 3 && strcmp(c->seg[1], "refunds") == 0)
	{
		object	   *o = find_object(c, c->seg[2], OB_REFUND);

		if (!o)
			stripe_error(c, 404, "invalid_request_error", "resource_missing", NULL, "id",
						 "No such refund.");
		else
		{
			set_json(c, 200);
			stripe_refund_json(&c->resp->body, o);
		}
	}
	else
		stripe_error(c, 404, "invalid_request_error", NULL, NULL, NULL,
					 "Unrecognized request URL. Please see https://stripe.com/docs.");
}

/* Authorization: Bearer sk_... or Basic base64(sk_...:) */
static int
stripe_auth(ctx *c)
{
	const char *a = http_header(c->req, "Authorization");
	char		keybuf[256];

	keybuf[0] = '\0';
	if (a && strncasecmp(a, "Bearer ", 7) == 0)
		copy(keybuf, sizeof(keybuf), a + 7);
	else if (a && strncasecmp(a, "Basic ", 6) == 0)
	{
		uint8_t		dec[256];
		long		n = strlen(a + 6) < 330 ? base64_decode(a + 6, strlen(a + 6), dec) : -1;

		if (n > 0)
		{
			char	   *colon;

			dec[n] = 0;
			colon = strchr((char *) dec, ':');
			if (colon)
				*colon = '\0';
			copy(keybuf, sizeof(keybuf), (char *) dec);
		}
	}
	if (!keybuf[0])
	{
		stripe_error(c, 401, "invalid_request_error", NULL, NULL, NULL,
					 "You did not provide an API key. You need to provide your API key in the "
					 "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').");
		return 0;
	}
	if (strncmp(keybuf, "sk_", 3) != 0 && strncmp(keybuf, "rk_", 3) != 0)
	{
		char		msg[200];

		snprintf(msg, sizeof(msg), "Invalid API Key provided: %.8s****", keybuf);
		stripe_error(c, 401, "invalid_request_error", NULL, NULL, NULL, msg);
		return 0;
	}
	copy(c->account, sizeof(c->account), keybuf);
	return 1;
}

/* ---------------------------------------------------------------- Adyen */

static void
adyen_amount(buf_t *b, long long v, const char *cur)
{
	buf_printf(b, "{\"currency\":\"%s\",\"value\":%lld}", cur, v);
}

static void
adyen_refusal(const char *code, const char **reason, const char **rcode, const char **result)
{
	*result = "Refused";
	if (strcmp(code, "insufficient_funds") == 0)
		*reason = "Not enough balance", *rcode = "12";
	else if (strcmp(code, "do_not_honor") == 0)
		*reason = "Declined Non Generic", *rcode = "27";
	else if (strcmp(code, "try_again_later") == 0 || strcmp(code, "issuer_not_available") == 0)
		*reason = "Issuer Unavailable", *rcode = "9";
	else if (strcmp(code, "processing_error") == 0)
		*reason = "Acquirer Error", *rcode = "4", *result = "Error";
	else if (strcmp(code, "lost_card") == 0 || strcmp(code, "stolen_card") == 0)
		*reason = "Blocked Card", *rcode = "5";
	else if (strcmp(code, "expired_card") == 0)
		*reason = "Expired Card", *rcode = "6";
	else if (strcmp(code, "fraudulent") == 0)
		*reason = "FRAUD", *rcode = "20";
	else
		*reason = "Refused", *rcode = "2";
}

/* amount {value, currency}: 1 ok, 0 error answered */
static int
adyen_get_amount(ctx *c, const jval *body, long long *value, char cur[4], int required)
{
	jval	   *a = jget(body, "amount");

	if (!a)
	{
		if (!required)
			return 1;
		adyen_error(c, 422, "100", "No amount specified", "validation");
		return 0;
	}
	if (a->t != J_OBJ || !jint(jget(a, "value"), value) || *value <= 0)
	{
		adyen_error(c, 422, "137", "Invalid amount specified", "validation");
		return 0;
	}
	if (!norm_currency(jstr(a, "currency"), cur))
	{
		adyen_error(c, 422, "138", "Unsupported currency specified", "validation");
		return 0;
	}
	return 1;
}

static void
adyen_payments(ctx *c)
{
	jval	   *body = c->json;
	jval	   *pm = jget(body, "paymentMethod");
	const char *merchant = jstr(body, "merchantAccount");
	const char *reference = jstr(body, "reference");
	const char *method = NULL;
	const char *d;
	long long	value = 0;
	char		cur[4] = "";
	char		psp[20];
	payment    *p;
	buf_t	   *b = &c->resp->body;
	jval	   *cdh = jget(body, "captureDelayHours");
	long long	delay = -1;

	if (!merchant || !*merchant)
	{
		adyen_error(c, 422, "901", "Invalid Merchant Account", "security");
		return;
	}
	if (!adyen_get_amount(c, body, &value, cur, 1))
		return;
	if (!reference || !*reference)
	{
		adyen_error(c, 422, "130", "Required field 'reference' is not provided.", "validation");
		return;
	}
	if (pm && pm->t == J_OBJ)
	{
		static const char *const refs[] = {
			"storedPaymentMethodId", "recurringDetailReference", "encryptedCardNumber", "number", "type", NULL
		};
		int			i;

		for (i = 0; refs[i] && !method; i++)
			method = jstr(pm, refs[i]);
	}
	if (!method || !*method)
	{
		adyen_error(c, 422, "101", "Invalid card number / missing paymentMethod", "validation");
		return;
	}
	copy(c->account, sizeof(c->account), merchant);
	if (cdh)
		jint(cdh, &delay);

	make_id(psp, sizeof(psp), "", 16, UPNUM);
	p = payment_new(c, psp);
	c->pay = p;
	p->amount = value;
	memcpy(p->currency, cur, 4);
	copy(p->method, sizeof(p->method), method);
	copy(p->reference, sizeof(p->reference), reference);
	p->capture_manual = delay != 0;
	d = authorize_outcome(c, value, method, jstr(pm, "holderName"));
	c->store = 1;
	set_json(c, 200);
	if (d)
	{
		const char *reason,
				   *rcode,
				   *result;

		adyen_refusal(d, &reason, &rcode, &result);
		p->declined = 1;
		copy(p->decline_code, sizeof(p->decline_code), d);
		copy(p->status, sizeof(p->status), result);
		ledger_add(c, OP_AUTHORIZE, p, psp, value, "declined", d);
		buf_printf(b, "{\"additionalData\":{\"refusalReasonRaw\":\"%s\"},\"pspReference\":\"%s\","
				   "\"refusalReason\":\"%s\",\"refusalReasonCode\":\"%s\",\"resultCode\":\"%s\",\"amount\":",
				   d, psp, reason, rcode, result);
		adyen_amount(b, value, cur);
		buf_adds(b, ",\"merchantReference\":");
		buf_json_cstr(b, reference);
		buf_adds(b, "}");
		return;
	}
	p->authorized = value;
	copy(p->status, sizeof(p->status), "Authorised");
	ledger_add(c, OP_AUTHORIZE, p, psp, value, "succeeded",
			   p->capture_manual ? "manual capture" : "automatic capture");
	if (!p->capture_manual)
	{
		p->captured = value;
		p->final_captured = 1;
		ledger_add(c, OP_CAPTURE, p, psp, value, "succeeded", "captureDelayHours=0");
	}
	buf_printf(b, "{\"additionalData\":{\"authCode\":\"%06llu\"},\"pspReference\":\"%s\","
			   "\"resultCode\":\"Authorised\",\"amount\":", (unsigned long long) (rnd() % 1000000), psp);
	adyen_amount(b, value, cur);
	buf_adds(b, ",\"merchantReference\":");
	buf_json_cstr(b, reference);
	buf_adds(b, ",\"paymentMethod\":{\"brand\":\"visa\",\"type\":\"scheme\"}}");
}

/* /payments/{pspReference}/captures|cancels|refunds */
static void
adyen_modification(ctx *c)
{
	jval	   *body = c->json;
	const char *merchant = jstr(body, "merchantAccount");
	const char *reference = jstr(body, "reference");
	const char *what = c->seg[3];
	payment    *p = find_payment(c, c->seg[2]);
	long long	value = 0;
	char		cur[4] = "";
	char		psp[20];
	int			op = strcmp(what, "captures") == 0 ? OP_CAPTURE :
		strcmp(what, "cancels") == 0 ? OP_CANCEL : OP_REFUND;
	object	   *o;
	buf_t	   *b = &c->resp->body;

	if (!merchant || !*merchant)
	{
		adyen_error(c, 422, "901", "Invalid Merchant Account", "security");
		return;
	}
	copy(c->account, sizeof(c->account), merchant);
	if (!p || strcmp(p->account, merchant) != 0)
	{
		adyen_error(c, 422, "167", "Original pspReference required for this operation", "validation");
		return;
	}
	c->pay = p;
	if (!adyen_get_amount(c, body, &value, cur, op != OP_CANCEL))
		return;
	if (op != OP_CANCEL && strcmp(cur, p->currency) != 0)
	{
		adyen_error(c, 422, "138", "Currency does not match the original payment", "validation");
		ledger_add(c, op, p, "", value, "rejected", "currency mismatch");
		return;
	}
	if (p->authorized == 0)
	{
		adyen_error(c, 422, "167", "The original payment was not authorised", "validation");
		ledger_add(c, op, p, "", value, "rejected", "not authorised");
		return;
	}
	if (op == OP_CAPTURE)
	{
		if (p->voided || p->final_captured)
		{
			adyen_error(c, 422, "167", "The payment is cancelled or already fully captured", "validation");
			ledger_add(c, op, p, "", value, "rejected", "unexpected state");
			return;
		}
		if (value > p->authorized - p->captured)
		{
			adyen_error(c, 422, "137", "Invalid amount specified: the amount exceeds the remaining authorised amount", "validation");
			ledger_add(c, op, p, "", value, "rejected", "amount exceeds authorised");
			return;
		}
	}
	else if (op == OP_CANCEL)
	{
		if (p->captured > 0 || p->voided)
		{
			adyen_error(c, 422, "167", "The payment is already captured or cancelled", "validation");
			ledger_add(c, op, p, "", 0, "rejected", "unexpected state");
			return;
		}
		value = p->authorized;
		memcpy(cur, p->currency, 4);
	}
	else
	{
		if (value > p->captured - p->refunded)
		{
			adyen_error(c, 422, "137", "Invalid amount specified: the amount exceeds the captured amount not yet refunded", "validation");
			ledger_add(c, op, p, "", value, "rejected", "amount exceeds captured");
			return;
		}
	}
	make_id(psp, sizeof(psp), "", 16, UPNUM);
	o = object_new(op == OP_CAPTURE ? OB_CAPTURE : op == OP_CANCEL ? OB_CANCEL : OB_REFUND,
				   psp, p, value, "received");
	copy(o->reference, sizeof(o->reference), reference);
	if (op == OP_CAPTURE)
	{
		p->captured += value;
		if (p->captured == p->authorized)
			p->final_captured = 1;
	}
	else if (op == OP_CANCEL)
		p->voided = 1;
	else
		p->refunded += value;
	ledger_add(c, op, p, psp, value, "succeeded", "");
	c->store = 1;
	set_json(c, 201);
	buf_adds(b, "{\"merchantAccount\":");
	buf_json_cstr(b, merchant);
	buf_printf(b, ",\"paymentPspReference\":\"%s\",\"pspReference\":\"%s\"", p->id, psp);
	if (reference)
	{
		buf_adds(b, ",\"reference\":");
		buf_json_cstr(b, reference);
	}
	buf_adds(b, ",\"status\":\"received\"");
	if (op != OP_CANCEL)
	{
		buf_adds(b, ",\"amount\":");
		adyen_amount(b, value, cur);
	}
	buf_adds(b, "}");
}

static int
adyen_version_ok(const char *s)
{
	if (s[0] != 'v' || !s[1])
		return 0;
	for (s++; *s; s++)
		if (!isdigit((unsigned char) *s))
			return 0;
	return 1;
}

static void
adyen_route(ctx *c)
{
	if (strcmp(c->req->method, "POST") != 0)
		return;
	if (c->nseg == 2)
		c->op = OP_AUTHORIZE;
	else if (c->nseg == 4)
	{
		if (strcmp(c->seg[3], "captures") == 0)
			c->op = OP_CAPTURE;
		else if (strcmp(c->seg[3], "cancels") == 0)
			c->op = OP_CANCEL;
		else if (strcmp(c->seg[3], "refunds") == 0)
			c->op = OP_REFUND;
	}
}

static void
adyen_execute(ctx *c)
{
	if (c->op == OP_AUTHORIZE)
		adyen_payments(c);
	else if (c->op == OP_CAPTURE || c->op == OP_CANCEL || c->op == OP_REFUND)
		adyen_modification(c);
	else
		adyen_error(c, 404, "000", "Not found", "validation");
}

static int
adyen_auth(ctx *c)
{
	const char *k = http_header(c->req, "X-API-Key");

	if (!k || !*k)
	{
		adyen_error(c, 401, "000", "HTTP Status Response - Unauthorized", "security");
		return 0;
	}
	copy(c->account, sizeof(c->account), k);
	return 1;
}

/* ---------------------------------------------------------------- PayPal */

static void
pp_amount(buf_t *b, long long v, const char *cur)
{
	char		dec[40];

	format_decimal(dec, sizeof(dec), v, cur);
	buf_printf(b, "{\"currency_code\":\"%s\",\"value\":\"%s\"}", cur, dec);
}

/* amount {currency_code, value}: 1 ok, 0 absent (allowed), -1 error answered */
static int
pp_get_amount(ctx *c, const jval *a, const char *field, long long *v, char cur[4])
{
	const char *val;
	int			r;
	char		f[80];

	if (!a)
		return 0;
	snprintf(f, sizeof(f), "%s/currency_code", field);
	if (a->t != J_OBJ || !norm_currency(jstr(a, "currency_code"), cur))
	{
		pp_400(c, "MISSING_REQUIRED_PARAMETER", f, "A required field / parameter is missing.");
		return -1;
	}
	snprintf(f, sizeof(f), "%s/value", field);
	val = jstr(a, "value");
	if (!val)
	{
		pp_400(c, "MISSING_REQUIRED_PARAMETER", f, "A required field / parameter is missing.");
		return -1;
	}
	r = parse_decimal(val, currency_exponent(cur), v);
	if (r == -1)
	{
		pp_400(c, "INVALID_PARAMETER_SYNTAX", f,
			   "The value of a field does not conform to the expected format.");
		return -1;
	}
	if (r == -2)
	{
		pp_422(c, "DECIMAL_PRECISION",
			   "The value has more decimal places than the currency allows (JPY 0, USD 2, KWD 3...).");
		return -1;
	}
	if (*v <= 0)
	{
		pp_400(c, "INVALID_PARAMETER_VALUE", f, "The value of a field is invalid.");
		return -1;
	}
	return 1;
}

static const char *
pp_base(ctx *c)
{
	static char base[80];

	(void) c;
	snprintf(base, sizeof(base), "http://127.0.0.1:%d", ports[LISTEN_MAIN]);
	return base;
}

static void
pp_order_json(ctx *c, buf_t *b, const payment *p)
{
	char		t[32];
	object	   *auth = p->auth_id[0] ? map_get(&objects, p->auth_id) : NULL;

	iso_time(t, sizeof(t), p->created);
	buf_printf(b, "{\"id\":\"%s\",\"intent\":\"AUTHORIZE\",\"status\":\"%s\","
			   "\"purchase_units\":[{\"reference_id\":\"default\",\"amount\":",
			   p->id, p->status);
	pp_amount(b, p->amount, p->currency);
	if (p->reference[0])
	{
		buf_adds(b, ",\"custom_id\":");
		buf_json_cstr(b, p->reference);
	}
	if (auth)
	{
		char		exp[32];

		iso_time(exp, sizeof(exp), auth->created + 29 * 86400);
		buf_printf(b, ",\"payments\":{\"authorizations\":[{\"id\":\"%s\",\"status\":\"%s\",\"amount\":",
				   auth->id, auth->status);
		pp_amount(b, auth->amount, p->currency);
		buf_printf(b, ",\"expiration_time\":\"%s\",\"create_time\":\"%s\",\"links\":["
				   "{\"href\":\"%s/v2/payments/authorizations/%s\",\"rel\":\"self\",\"method\":\"GET\"},"
				   "{\"href\":\"%s/v2/payments/authorizations/%s/capture\",\"rel\":\"capture\",\"method\":\"POST\"},"
				   "{\"href\":\"%s/v2/payments/authorizations/%s/void\",\"rel\":\"void\",\"method\":\"POST\"}]}]}",
				   exp, t, pp_base(c), auth->id, pp_base(c), auth->id, pp_base(c), auth->id);
	}
	buf_adds(b, "}]");
	if (p->method[0])
	{
		buf_adds(b, ",\"payment_source\":{\"card\":{\"vault_id\":");
		buf_json_cstr(b, p->method);
		buf_adds(b, "}}");
	}
	buf_printf(b, ",\"create_time\":\"%s\",\"links\":[{\"href\":\"%s/v2/checkout/orders/%s\",\"rel\":\"self\",\"method\":\"GET\"},"
			   "{\"href\":\"%s/v2/checkout/orders/%s/authorize\",\"rel\":\"authorize\",\"method\":\"POST\"}]}",
			   t, pp_base(c), p->id, pp_base(c), p->id);
}

/* the payment-method reference inside a payment_source object */
static const char *
pp_source_method(const jval *ps)
{
	static const char *const kinds[] = {"card", "paypal", "venmo", NULL};
	int			i;
	jval	   *tok;

	if (!ps || ps->t != J_OBJ)
		return NULL;
	for (i = 0; kinds[i]; i++)
	{
		jval	   *k = jget(ps, kinds[i]);

		if (k && jstr(k, "vault_id"))
			return jstr(k, "vault_id");
	}
	tok = jget(ps, "token");
	if (tok && jstr(tok, "id"))
		return jstr(tok, "id");
	return NULL;
}

static void
pp_create_order(ctx *c)
{
	jval	   *body = c->json;
	const char *intent = jstr(body, "intent");
	jval	   *pu = jget(body, "purchase_units");
	jval	   *u0;
	long long	v;
	char		cur[4];
	char		id[24];
	payment    *p;
	const char *method;
	int			r;

	if (!intent)
	{
		pp_400(c, "MISSING_REQUIRED_PARAMETER", "/intent", "A required field / parameter is missing.");
		return;
	}
	if (strcmp(intent, "AUTHORIZE") != 0)
	{
		pp_422(c, "UNSUPPORTED_INTENT", "market-test-psp supports intent AUTHORIZE only.");
		return;
	}
	if (!pu || pu->t != J_ARR || pu->n == 0)
	{
		pp_400(c, "MISSING_REQUIRED_PARAMETER", "/purchase_units",
			   "A required field / parameter is missing.");
		return;
	}
	if (pu->n > 1)
	{
		pp_422(c, "MULTIPLE_PURCHASE_UNITS_NOT_SUPPORTED",
			   "market-test-psp supports one purchase unit per order.");
		return;
	}
	u0 = pu->items[0];
	r = pp_get_amount(c, jget(u0, "amount"), "/purchase_units/@reference_id=='default'/amount", &v, cur);
	if (r < 0)
		return;
	if (r == 0)
	{
		pp_400(c, "MISSING_REQUIRED_PARAMETER", "/purchase_units/@reference_id=='default'/amount",
			   "A required field / parameter is missing.");
		return;
	}
	make_id(id, sizeof(id), "", 17, UPNUM);
	p = payment_new(c, id);
	c->pay = p;
	p->amount = v;
	memcpy(p->currency, cur, 4);
	p->capture_manual = 1;
	if (jstr(u0, "custom_id"))
		copy(p->reference, sizeof(p->reference), jstr(u0, "custom_id"));
	else if (jstr(u0, "invoice_id"))
		copy(p->reference, sizeof(p->reference), jstr(u0, "invoice_id"));
	else if (jstr(u0, "reference_id") && strcmp(jstr(u0, "reference_id"), "default") != 0)
		copy(p->reference, sizeof(p->reference), jstr(u0, "reference_id"));
	method = pp_source_method(jget(body, "payment_source"));
	copy(p->method, sizeof(p->method), method);
	copy(p->status, sizeof(p->status), method ? "APPROVED" : "CREATED");
	ledger_add(c, OP_CREATE, p, "", v, "succeeded", p->status);
	c->store = 1;
	set_json(c, 201);
	pp_order_json(c, &c->resp->body, p);
}

static void
pp_authorize(ctx *c)
{
	payment    *p = find_payment(c, c->seg[3]);
	const char *method;
	const char *d;
	char		aid[24];

	if (!p)
	{
		pp_404(c, "Specified resource ID does not exist. Please check the resource ID and try again.");
		return;
	}
	c->pay = p;
	method = pp_source_method(jget(c->json, "payment_source"));
	if (method)
		copy(p->method, sizeof(p->method), method);
	if (p->auth_id[0])
	{
		pp_422(c, "ORDER_ALREADY_AUTHORIZED", "Order already authorized. If 'intent=AUTHORIZE' only one authorization per order is allowed.");
		ledger_add(c, OP_AUTHORIZE, p, "", p->amount, "rejected", "already authorized");
		return;
	}
	if (!p->method[0])
	{
		pp_422(c, "ORDER_NOT_APPROVED", "Payer has not yet approved the Order for payment.");
		return;
	}
	d = authorize_outcome(c, p->amount, p->method, NULL);
	c->store = 1;
	if (d)
	{
		char		desc[200];

		p->declined = 1;
		copy(p->decline_code, sizeof(p->decline_code), d);
		ledger_add(c, OP_AUTHORIZE, p, "", p->amount, "declined", d);
		if (decline_is_soft(d))
		{
			snprintf(desc, sizeof(desc), "The instrument presented was either declined by the processor "
					 "or bank, or it can't be used for this payment (decline code %s).", d);
			pp_422(c, "INSTRUMENT_DECLINED", desc);
		}
		else
		{
			snprintf(desc, sizeof(desc), "The request was refused (decline code %s).", d);
			pp_422(c, "TRANSACTION_REFUSED", desc);
		}
		return;
	}
	p->declined = 0;
	make_id(aid, sizeof(aid), "", 17, UPNUM);
	copy(p->auth_id, sizeof(p->auth_id), aid);
	object_new(OB_AUTH, aid, p, p->amount, "CREATED");
	p->authorized = p->amount;
	copy(p->status, sizeof(p->status), "COMPLETED");
	ledger_add(c, OP_AUTHORIZE, p, aid, p->amount, "succeeded", "");
	set_json(c, 201);
	pp_order_json(c, &c->resp->body, p);
}

static void
pp_capture_json(ctx *c, buf_t *b, const object *o)
{
	char		t[32];

	iso_time(t, sizeof(t), o->created);
	buf_printf(b, "{\"id\":\"%s\",\"status\":\"%s\",\"amount\":", o->id, o->status);
	pp_amount(b, o->amount, o->p->currency);
	buf_printf(b, ",\"final_capture\":%s", o->final ? "true" : "false");
	if (o->p->reference[0])
	{
		buf_adds(b, ",\"custom_id\":");
		buf_json_cstr(b, o->p->reference);
	}
	buf_printf(b, ",\"create_time\":\"%s\",\"update_time\":\"%s\",\"links\":["
			   "{\"href\":\"%s/v2/payments/captures/%s\",\"rel\":\"self\",\"method\":\"GET\"},"
			   "{\"href\":\"%s/v2/payments/captures/%s/refund\",\"rel\":\"refund\",\"method\":\"POST\"},"
			   "{\"href\":\"%s/v2/payments/authorizations/%s\",\"rel\":\"up\",\"method\":\"GET\"}]}",
			   t, t, pp_base(c), o->id, pp_base(c), o->id, pp_base(c), o->p->auth_id);
}

static void
pp_auth_json(ctx *c, buf_t *b, const object *o)
{
	char		t[32],
				exp[32];

	iso_time(t, sizeof(t), o->created);
	iso_time(exp, sizeof(exp), o->created + 29 * 86400);
	buf_printf(b, "{\"id\":\"%s\",\"status\":\"%s\",\"amount\":", o->id, o->status);
	pp_amount(b, o->amount, o->p->currency);
	if (o->p->reference[0])
	{
		buf_adds(b, ",\"custom_id\":");
		buf_json_cstr(b, o->p->reference);
	}
	buf_printf(b, ",\"supplementary_data\":{\"related_ids\":{\"order_id\":\"%s\"}},"
			   "\"expiration_time\":\"%s\",\"create_time\":\"%s\",\"links\":["
			   "{\"href\":\"%s/v2/payments/authorizations/%s\",\"rel\":\"self\",\"method\":\"GET\"}]}",
			   o->p->id, exp, t, pp_base(c), o->id);
}

static void
pp_auth_action(ctx *c)
{
	object	   *auth = find_object(c, c->seg[3], OB_AUTH);
	payment    *p;

	if (!auth)
	{
		pp_404(c, "Specified resource ID does not exist. Please check the resource ID and try again.");
		return;
	}
	p = auth->p;
	c->pay = p;
	if (strcmp(c->seg[4], "capture") == 0)
	{
		long long	v;
		char		cur[4];
		int			r = pp_get_amount(c, jget(c->json, "amount"), "/amount", &v, cur);
		jval	   *fc = jget(c->json, "final_capture");
		int			final = fc && fc->t == J_BOOL && fc->b;
		char		cid[24];
		object	   *o;

		if (r < 0)
			return;
		if (p->voided)
		{
			pp_422(c, "AUTHORIZATION_VOIDED", "A voided authorization cannot be captured or reauthorized.");
			ledger_add(c, OP_CAPTURE, p, "", 0, "rejected", "voided");
			return;
		}
		if (p->final_captured)
		{
			pp_422(c, "AUTHORIZATION_ALREADY_CAPTURED", "Authorization has been previously captured and hence cannot be captured again.");
			ledger_add(c, OP_CAPTURE, p, "", 0, "rejected", "already captured");
			return;
		}
		if (r == 0)
		{
			v = p->authorized - p->captured;
			memcpy(cur, p->currency, 4);
		}
		if (strcmp(cur, p->currency) != 0)
		{
			pp_422(c, "CURRENCY_MISMATCH", "Currency of capture must be the same as currency of authorization.");
			ledger_add(c, OP_CAPTURE, p, "", v, "rejected", "currency mismatch");
			return;
		}
		if (v > p->authorized - p->captured)
		{
			pp_422(c, "MAX_CAPTURE_AMOUNT_EXCEEDED", "Capture amount exceeds allowable limit.");
			ledger_add(c, OP_CAPTURE, p, "", v, "rejected", "amount exceeds authorized");
			return;
		}
		make_id(cid, sizeof(cid), "", 17, UPNUM);
		o = object_new(OB_CAPTURE, cid, p, v, "COMPLETED");
		o->final = final;
		p->captured += v;
		if (final || p->captured == p->authorized)
		{
			p->final_captured = 1;
			copy(auth->status, sizeof(auth->status), "CAPTURED");
		}
		else
			copy(auth->status, sizeof(auth->status), "PARTIALLY_CAPTURED");
		ledger_add(c, OP_CAPTURE, p, cid, v, "succeeded", final ? "final" : "not final");
		c->store = 1;
		set_json(c, 201);
		pp_capture_json(c, &c->resp->body, o);
		return;
	}
	/* void */
	if (p->voided)
	{
		pp_422(c, "AUTHORIZATION_VOIDED", "A voided authorization cannot be voided again.");
		ledger_add(c, OP_CANCEL, p, "", 0, "rejected", "voided");
		return;
	}
	if (p->final_captured)
	{
		pp_422(c, "AUTHORIZATION_ALREADY_CAPTURED", "Authorization has been previously captured and hence cannot be voided.");
		ledger_add(c, OP_CANCEL, p, "", 0, "rejected", "already captured");
		return;
	}
	p->voided = 1;
	copy(auth->status, sizeof(auth->status), "VOIDED");
	ledger_add(c, OP_CANCEL, p, auth->id, p->authorized - p->captured, "succeeded", "");
	c->store = 1;
	{
		const char *prefer = http_header(c->req, "Prefer");

		if (prefer && strstr(prefer, "return=representation"))
		{
			set_json(c, 200);
			pp_auth_json(c, &c->resp->body, auth);
		}
		else
			set_json(c, 204);
	}
}

static void
pp_refund(ctx *c)
{
	object	   *cap = find_object(c, c->seg[3], OB_CAPTURE);
	payment    *p;
	long long	v;
	char		cur[4];
	char		rid[24];
	int			r;
	object	   *o;
	buf_t	   *b = &c->resp->body;
	char		t[32];

	if (!cap)
	{
		pp_404(c, "Specified resource ID does not exist. Please check the resource ID and try again.");
		return;
	}
	p = cap->p;
	c->pay = p;
	r = pp_get_amount(c, jget(c->json, "amount"), "/amount", &v, cur);
	if (r < 0)
		return;
	if (r == 0)
	{
		v = cap->amount - cap->refunded;
		memcpy(cur, p->currency, 4);
	}
	if (cap->refunded == cap->amount)
	{
		pp_422(c, "CAPTURE_FULLY_REFUNDED", "The capture has already been fully refunded.");
		ledger_add(c, OP_REFUND, p, "", v, "rejected", "fully refunded");
		return;
	}
	if (strcmp(cur, p->currency) != 0)
	{
		pp_422(c, "REFUND_CURRENCY_MISMATCH", "Refund must be in the same currency as the capture.");
		ledger_add(c, OP_REFUND, p, "", v, "rejected", "currency mismatch");
		return;
	}
	if (v > cap->amount - cap->refunded)
	{
		pp_422(c, "REFUND_AMOUNT_EXCEEDED", "The refund amount must be less than or equal to the capture amount that has not yet been refunded.");
		ledger_add(c, OP_REFUND, p, "", v, "rejected", "amount exceeds captured");
		return;
	}
	make_id(rid, sizeof(rid), "", 17, UPNUM);
	o = object_new(OB_REFUND, rid, p, v, "COMPLETED");
	cap->refunded += v;
	copy(cap->status, sizeof(cap->status), cap->refunded == cap->amount ? "REFUNDED" : "PARTIALLY_REFUNDED");
	p->refunded += v;
	ledger_add(c, OP_REFUND, p, rid, v, "succeeded", cap->id);
	c->store = 1;
	set_json(c, 201);
	iso_time(t, sizeof(t), o->created);
	buf_printf(b, "{\"id\":\"%s\",\"status\":\"COMPLETED\",\"amount\":", rid);
	pp_amount(b, v, p->currency);
	buf_printf(b, ",\"create_time\":\"%s\",\"links\":[{\"href\":\"%s/v2/payments/refunds/%s\",\"rel\":\"self\",\"method\":\"GET\"},"
			   "{\"href\":\"%s/v2/payments/captures/%s\",\"rel\":\"up\",\"method\":\"GET\"}]}",
			   t, pp_base(c), rid, pp_base(c), cap->id);
}

static void
pp_token(ctx *c)
{
	const char *a = http_header(c->req, "Authorization");
	const char *gt = fget(c, "grant_type");
	uint8_t		dec[512];
	long		n = -1;
	char	   *colon = NULL;
	char		tok[100];
	token	   *t;
	buf_t	   *b = &c->resp->body;

	if (a && strncasecmp(a, "Basic ", 6) == 0 && strlen(a + 6) < 600)
		n = base64_decode(a + 6, strlen(a + 6), dec);
	if (n > 0)
	{
		dec[n] = 0;
		colon = strchr((char *) dec, ':');
	}
	if (!colon || colon == (char *) dec || !colon[1])
	{
		set_json(c, 401);
		buf_adds(b, "{\"error\":\"invalid_client\",\"error_description\":\"Client Authentication failed\"}");
		return;
	}
	*colon = '\0';
	if (!gt || strcmp(gt, "client_credentials") != 0)
	{
		set_json(c, 400);
		buf_adds(b, "{\"error\":\"unsupported_grant_type\",\"error_description\":\"Grant Type is NULL or not supported\"}");
		return;
	}
	copy(c->account, sizeof(c->account), (char *) dec);
	make_id(tok, sizeof(tok), "A21AA", 80, ALNUM);
	t = xcalloc(1, sizeof(token));
	copy(t->client_id, sizeof(t->client_id), (char *) dec);
	t->expires_ms = now_ms() + paypal_token_ttl * 1000;
	map_put(&tokens, tok, t);
	set_json(c, 200);
	buf_printf(b, "{\"scope\":\"https://uri.paypal.com/services/payments/payment/authcapture openid\","
			   "\"access_token\":\"%s\",\"token_type\":\"Bearer\",\"app_id\":\"APP-80W284485P519543T\","
			   "\"expires_in\":%ld,\"nonce\":\"%lld-market-test-psp\"}", tok, paypal_token_ttl, unix_now());
}

static int
paypal_auth(ctx *c)
{
	const char *a = http_header(c->req, "Authorization");
	token	   *t = NULL;

	if (c->op == OP_TOKEN)
		return 1;
	if (a && strncasecmp(a, "Bearer ", 7) == 0)
		t = map_get(&tokens, a + 7);
	if (!t || t->expires_ms <= now_ms())
	{
		set_json(c, 401);
		buf_printf(&c->resp->body, "{\"error\":\"invalid_token\",\"error_description\":\"%s\"}",
				   t ? "Access Token not found in cache" : "Token signature verification failed");
		return 0;
	}
	copy(c->account, sizeof(c->account), t->client_id);
	return 1;
}

static void
paypal_route(ctx *c)
{
	int			post = strcmp(c->req->method, "POST") == 0;
	int			get = strcmp(c->req->method, "GET") == 0;

	if (c->nseg == 3 && strcmp(c->seg[0], "v1") == 0 && post)
		c->op = OP_TOKEN;
	else if (strcmp(c->seg[0], "v2") != 0)
		return;
	else if (c->nseg == 3 && strcmp(c->seg[1], "checkout") == 0 && post)
		c->op = OP_CREATE;
	else if (c->nseg == 4 && get)
		c->op = OP_LOOKUP;
	else if (c->nseg == 5 && post && strcmp(c->seg[1], "checkout") == 0 && strcmp(c->seg[4], "authorize") == 0)
		c->op = OP_AUTHORIZE;
	else if (c->nseg == 5 && post && strcmp(c->seg[2], "authorizations") == 0 && strcmp(c->seg[4], "capture") == 0)
		c->op = OP_CAPTURE;
	else if (c->nseg == 5 && post && strcmp(c->seg[2], "authorizations") == 0 && strcmp(c->seg[4], "void") == 0)
		c->op = OP_CANCEL;
	else if (c->nseg == 5 && post && strcmp(c->seg[2], "captures") == 0 && strcmp(c->seg[4], "refund") == 0)
		c->op = OP_REFUND;
}

static void
paypal_execute(ctx *c)
{
	switch (c->op)
	{
		case OP_TOKEN:
			pp_token(c);
			return;
		case OP_CREATE:
			pp_create_order(c);
			return;
		case OP_AUTHORIZE:
			pp_authorize(c);
			return;
		case OP_CAPTURE:
		case OP_CANCEL:
			pp_auth_action(c);
			return;
		case OP_REFUND:
			pp_refund(c);
			return;
		case OP_LOOKUP:
			{
				const char *what = c->seg[2];
				const char *id = c->seg[3];

				if (strcmp(c->seg[1], "checkout") == 0 && strcmp(what, "orders") == 0)
				{
					payment    *p = find_payment(c, id);

					if (p)
					{
						set_json(c, 200);
						pp_order_json(c, &c->resp->body, p);
						return;
					}
				}
				else if (strcmp(what, "authorizations") == 0)
				{
					object	   *o = find_object(c, id, OB_AUTH);

					if (o)
					{
						set_json(c, 200);
						pp_auth_json(c, &c->resp->body, o);
						return;
					}
				}
				else if (strcmp(what, "captures") == 0)
				{
					object	   *o = find_object(c, id, OB_CAPTURE);

					if (o)
					{
						set_json(c, 200);
						pp_capture_json(c, &c->resp->body, o);
						return;
					}
				}
				else if (strcmp(what, "refunds") == 0)
				{
					object	   *o = find_object(c, id, OB_REFUND);

					if (o)
					{
						set_json(c, 200);
						buf_printf(&c->resp->body, "{\"id\":\"%s\",\"status\":\"%s\",\"amount\":", o->id, o->status);
						pp_amount(&c->resp->body, o->amount, o->p->currency);
						buf_adds(&c->resp->body, "}");
						return;
					}
				}
				pp_404(c, "Specified resource ID does not exist. Please check the resource ID and try again.");
				return;
			}
		default:
			paypal_error(c, 404, "RESOURCE_NOT_FOUND", "The specified resource does not exist.",
						 NULL, NULL, NULL);
	}
}

/* ---------------------------------------------------------------- idempotency */

static void
idem_free(void *v)
{
	idem	   *e = v;

	if (e->in_flight)
	{
		/* a pending delivery still points at it: psp_delivered frees it */
		e->orphan = 1;
		return;
	}
	free(e->key);
	free(e->headers);
	free(e->body);
	free(e);
}

/* the first answer for this key has gone out (or its client is gone) */
void
psp_delivered(struct idem *e)
{
	e->in_flight = 0;
	in_flight_n--;
	if (e->orphan)
		idem_free(e);
}

/* the header carrying the idempotency key, per personality */
static const char *
idem_header(int kind)
{
	return kind == K_PAYPAL ? "PayPal-Request-Id" : "Idempotency-Key";
}

static void
idem_conflict(ctx *c, const char *key)
{
	char		msg[512];

	stats[c->kind].conflicts++;
	if (c->kind == K_STRIPE)
	{
		snprintf(msg, sizeof(msg),
				 "There is currently another in-progress request using this Idempotent Key "
				 "(that probably means you submitted twice, and the other request is still "
				 "going through): %.200s. Please try again later.", key);
		stripe_error(c, 409, "invalid_request_error", "idempotency_key_in_use", NULL, NULL, msg);
	}
	else if (c->kind == K_ADYEN)
		adyen_error(c, 422, "704", "request already processed or in progress", "validation");
	else
		pp_422(c, "PREVIOUS_REQUEST_IN_PROGRESS",
			   "A previous request on this resource is currently in progress. Please wait for some time and try again.");
}

static void
idem_mismatch(ctx *c, const char *key)
{
	char		msg[512];

	stats[c->kind].mismatches++;
	if (c->kind == K_STRIPE)
	{
		snprintf(msg, sizeof(msg),
				 "Keys for idempotent requests can only be used with the same parameters they "
				 "were first used with. Try using a key other than '%.200s' if you meant to "
				 "execute a different request.", key);
		stripe_error(c, 400, "idempotency_error", NULL, NULL, NULL, msg);
	}
	else if (c->kind == K_ADYEN)
		adyen_error(c, 422, "704",
					"request already processed or in progress: the Idempotency-Key was used with a different request",
					"validation");
	else
		pp_422(c, "PAYPAL_REQUEST_ID_PREVIOUSLY_USED",
			   "The PayPal-Request-ID has already been used for another request.");
}

/* ---------------------------------------------------------------- routing */

/* which personality serves this path, or -1 */
static int
route_kind(ctx *c)
{
	if (c->nseg >= 2 && strcmp(c->seg[0], "v1") == 0 &&
		(strcmp(c->seg[1], "payment_intents") == 0 || strcmp(c->seg[1], "refunds") == 0))
		return K_STRIPE;
	if (c->nseg == 3 && strcmp(c->seg[0], "v1") == 0 && strcmp(c->seg[1], "oauth2") == 0 &&
		strcmp(c->seg[2], "token") == 0)
		return K_PAYPAL;
	if (c->nseg >= 3 && strcmp(c->seg[0], "v2") == 0 &&
		(strcmp(c->seg[1], "checkout") == 0 || strcmp(c->seg[1], "payments") == 0))
		return K_PAYPAL;
	if (c->nseg >= 2 && adyen_version_ok(c->seg[0]) && strcmp(c->seg[1], "payments") == 0)
		return K_ADYEN;
	return -1;
}

static void
not_found(ctx *c)
{
	switch (c->kind)
	{
		case K_STRIPE:
			stripe_error(c, 404, "invalid_request_error", NULL, NULL, NULL,
						 "Unrecognized request URL. Please see https://stripe.com/docs.");
			break;
		case K_ADYEN:
			adyen_error(c, 404, "000", "Not found", "validation");
			break;
		default:
			paypal_error(c, 404, "RESOURCE_NOT_FOUND", "The specified resource does not exist.",
						 NULL, NULL, NULL);
	}
}

/* malformed request body */
static void
bad_body(ctx *c, const char *why)
{
	char		msg[300];

	snprintf(msg, sizeof(msg), "Malformed request body: %.200s", why);
	if (c->kind == K_ADYEN)
		adyen_error(c, 400, "702", msg, "validation");
	else
		paypal_error(c, 400, "INVALID_REQUEST", PP_INVALID_REQUEST, "MALFORMED_REQUEST_JSON",
					 NULL, msg);
}

static void
control_handle(ctx *c);

/* entry point: one HTTP request in, one response plan out */
void
psp_handle(http_req *req, http_resp *resp)
{
	ctx			c;
	char	   *pathcopy = xstrdup(req->path);
	char	   *s;
	fault	   *f;
	fault	   *tech = NULL;
	long		latency = 0;
	idem	   *entry = NULL;
	int			created_entry = 0;
	const char *key = NULL;
	buf_t		scope;
	uint8_t		fp[32];
	int			i;

	buf_init(&scope);
	memset(&c, 0, sizeof(c));
	c.req = req;
	c.resp = resp;
	c.op = -1;
	c.kind = -1;
	resp->status = 200;
	resp->action = ACT_SEND;
	for (s = strtok(pathcopy, "/"); s && c.nseg < 10; s = strtok(NULL, "/"))
		c.seg[c.nseg++] = s;

	if (c.nseg >= 1 && strcmp(c.seg[0], "_control") == 0 &&
		(req->listener == LISTEN_MAIN || req->listener == LISTEN_CONTROL))
	{
		control_requests++;
		control_handle(&c);
		goto cleanup;
	}
	c.kind = route_kind(&c);
	if (c.kind < 0 || req->listener == LISTEN_CONTROL ||
		(req->listener == LISTEN_STRIPE && c.kind != K_STRIPE) ||
		(req->listener == LISTEN_ADYEN && c.kind != K_ADYEN) ||
		(req->listener == LISTEN_PAYPAL && c.kind != K_PAYPAL))
	{
		set_json(&c, 404);
		buf_adds(&resp->body, "{\"error\":\"no such endpoint on market-test-psp\"}");
		goto cleanup;
	}
	stats[c.kind].requests++;

	/* a PSP that is down answers nothing else */
	f = down_rule(c.kind);
	if (f)
	{
		if (f->count > 0)
			f->count--;
		f->applied++;
		stats[c.kind].faults++;
		if (f->refuse)
			resp->action = ACT_RESET;
		else
			server_error(&c, f->status ? f->status : 503);
		goto finish;
	}

	/* bodies: Stripe and the PayPal token endpoint take forms, the rest JSON */
	if (c.kind == K_STRIPE || (c.kind == K_PAYPAL && c.nseg == 3 && strcmp(c.seg[0], "v1") == 0))
		parse_form(&c, req->body, req->body_len);
	if (c.kind == K_STRIPE)
		stripe_route(&c);
	else if (c.kind == K_ADYEN)
		adyen_route(&c);
	else
		paypal_route(&c);
	if (c.op < 0)
	{
		not_found(&c);
		goto finish;
	}
	if (c.kind == K_STRIPE && !stripe_auth(&c))
		goto finish;
	if (c.kind == K_ADYEN && !adyen_auth(&c))
		goto finish;
	if (c.kind == K_PAYPAL && !paypal_auth(&c))
		goto finish;
	if (c.kind != K_STRIPE && c.op != OP_TOKEN && req->body_len > 0)
	{
		char		err[160];

		c.json = json_parse(req->body, req->body_len, err, sizeof(err));
		if (!c.json || c.json->t != J_OBJ)
		{
			bad_body(&c, c.json ? "the body is not a JSON object" : err);
			goto finish;
		}
	}
	if (c.kind == K_ADYEN && !c.json)
	{
		bad_body(&c, "empty body");
		goto finish;
	}

	/* faults: latency adds up; the first technical fault that applies wins */
	for (f = faults; f; f = f->next)
	{
		if (f->type == F_LATENCY)
		{
			if (fault_take(f, c.kind, c.op, c.account))
			{
				latency += f->ms;
				stats[c.kind].faults++;
			}
		}
		else if (!tech && (f->type == F_HOLD || f->type == F_DROP || f->type == F_RESET ||
						   f->type == F_ERROR || f->type == F_MALFORMED))
		{
			if (fault_take(f, c.kind, c.op, c.account))
			{
				tech = f;
				stats[c.kind].faults++;
			}
		}
	}
	if (tech && !tech->charged && (tech->type == F_ERROR || tech->type == F_RESET))
	{
		/* failed in front of the PSP: nothing executed, nothing stored */
		if (tech->type == F_RESET)
			resp->action = ACT_RESET;
		else
			server_error(&c, tech->status);
		goto finish;
	}

	/* idempotency */
	if (strcmp(req->method, "POST") == 0 && c.op != OP_TOKEN)
	{
		key = http_header(req, idem_header(c.kind));
		if (key && !*key)
			key = NULL;
	}
	c.idem_key = key;
	if (key)
	{
		buf_printf(&scope, "%s|%s|%s", kind_name[c.kind], c.account, key);
		fingerprint(&c, fp);
		entry = map_get(&idems, scope.p);
		if (entry && entry->in_flight)
		{
			idem_conflict(&c, key);
			entry = NULL;
			goto finish;
		}
		if (entry && memcmp(entry->fp, fp, 32) != 0)
		{
			idem_mismatch(&c, key);
			entry = NULL;
			goto finish;
		}
		if (entry)
		{
			/* replay the stored answer */
			stats[c.kind].replays++;
			resp->status = entry->status;
			resp->action = ACT_SEND;
			if (entry->headers)
				buf_adds(&resp->headers, entry->headers);
			if (entry->body_len)
				buf_add(&resp->body, entry->body, entry->body_len);
			if (c.kind == K_STRIPE)
				add_header(&c, "Idempotent-Replayed", "true");
			entry = NULL;
			goto post;
		}
	}

	if (c.kind == K_STRIPE)
		stripe_execute(&c);
	else if (c.kind == K_ADYEN)
		adyen_execute(&c);
	else
		paypal_execute(&c);

	if (key && c.store)
	{
		/* the outcome of an executed operation is kept for replays */
		entry = xcalloc(1, sizeof(idem));
		entry->key = scope.p;
		buf_init(&scope);
		memcpy(entry->fp, fp, 32);
		entry->status = resp->status;
		entry->headers = resp->headers.len ? xstrndup(resp->headers.p, resp->headers.len) : NULL;
		entry->body = xstrndup(resp->body.p ? resp->body.p : "", resp->body.len);
		entry->body_len = resp->body.len;
		map_put(&idems, entry->key, entry);
		created_entry = 1;
	}

post:
	if (tech)
	{
		switch (tech->type)
		{
			case F_HOLD:
				latency += tech->ms > 0 ? tech->ms : 30000;
				break;
			case F_DROP:
				resp->action = ACT_CLOSE;
				break;
			case F_RESET:
				resp->action = ACT_RESET;
				break;
			case F_ERROR:
				buf_free(&resp->body);
				buf_free(&resp->headers);
				server_error(&c, tech->status);
				break;
			case F_MALFORMED:
				if (resp->body.len > 1)
				{
					resp->body.len = resp->body.len / 2;
					resp->body.p[resp->body.len] = '\0';
				}
				else
					buf_adds(&resp->body, "{\"id\":");
				resp->status = 200;
				break;
		}
	}

finish:
	resp->delay_ms = latency;
	if (created_entry && latency > 0)
	{
		entry->in_flight = 1;
		in_flight_n++;
		resp->idem = entry;
	}
	if (c.kind >= 0)
	{
		char		id[32];

		if (c.kind == K_STRIPE)
		{
			make_id(id, sizeof(id), "req_", 14, ALNUM);
			add_header(&c, "Request-Id", id);
			add_header(&c, "Stripe-Version", "2024-06-20");
		}
		else if (c.kind == K_PAYPAL)
		{
			make_id(id, sizeof(id), "", 13, "0123456789abcdef");
			add_header(&c, "Paypal-Debug-Id", id);
		}
		if (key && c.kind != K_PAYPAL)
			add_header(&c, "Idempotency-Key", key);
		if (resp->action != ACT_SEND)
			stats[c.kind].no_answer++;
		else if (resp->status < 300)
			stats[c.kind].s2xx++;
		else if (resp->status < 500)
			stats[c.kind].s4xx++;
		else
			stats[c.kind].s5xx++;
	}

cleanup:
	buf_free(&scope);
	for (i = 0; i < c.nform; i++)
	{
		free(c.form[i].k);
		free(c.form[i].v);
	}
	free(c.form);
	json_free(c.json);
	free(pathcopy);
}

/* ---------------------------------------------------------------- control */

static void
ctl_error(ctx *c, int status, const char *msg)
{
	set_json(c, status);
	buf_adds(&c->resp->body, "{\"error\":");
	buf_json_cstr(&c->resp->body, msg);
	buf_adds(&c->resp->body, "}");
}

/* value of a query-string parameter (URL-decoded, caller frees), or NULL */
static char *
query_param(const char *q, const char *name)
{
	size_t		nl = strlen(name);

	while (q && *q)
	{
		const char *amp = strchr(q, '&');
		size_t		len = amp ? (size_t) (amp - q) : strlen(q);

		if (len > nl && strncmp(q, name, nl) == 0 && q[nl] == '=')
			return url_decode(q + nl + 1, len - nl - 1);
		q = amp ? amp + 1 : NULL;
	}
	return NULL;
}

static void
payment_json(buf_t *b, const payment *p)
{
	buf_printf(b, "{\"psp\":\"%s\",\"id\":\"%s\"", kind_name[p->kind], p->id);
	if (p->charge_id[0])
		buf_printf(b, ",\"charge_id\":\"%s\"", p->charge_id);
	if (p->auth_id[0])
		buf_printf(b, ",\"authorization_id\":\"%s\"", p->auth_id);
	buf_adds(b, ",\"account\":");
	buf_json_cstr(b, p->account);
	buf_adds(b, ",\"reference\":");
	buf_json_cstr(b, p->reference);
	buf_adds(b, ",\"method\":");
	buf_json_cstr(b, p->method);
	buf_printf(b, ",\"currency\":\"%s\",\"amount\":%lld,\"authorized\":%lld,\"captured\":%lld,"
			   "\"refunded\":%lld,\"state\":\"%s\",\"status\":",
			   p->currency, p->amount, p->authorized, p->captured, p->refunded, payment_state(p));
	buf_json_cstr(b, p->status);
	if (p->declined)
		buf_printf(b, ",\"decline_code\":\"%s\",\"soft_decline\":%s", p->decline_code,
				   decline_is_soft(p->decline_code) ? "true" : "false");
	buf_adds(b, ",\"idempotency_key\":");
	buf_json_cstr(b, p->idem_key[0] ? p->idem_key : NULL);
	buf_printf(b, ",\"metadata\":%s,\"created\":%lld}", p->metadata, p->created);
}

static int
seqcmp(const void *a, const void *b)
{
	const payment *const *x = a;
	const payment *const *y = b;

	return (*x)->seq < (*y)->seq ? -1 : (*x)->seq > (*y)->seq;
}

/* GET /_control/ledger[?reference=R][&psp=K][&payment=ID] */
static void
ctl_ledger(ctx *c)
{
	char	   *ref = query_param(c->req->query, "reference");
	char	   *psp = query_param(c->req->query, "psp");
	char	   *pid = query_param(c->req->query, "payment");
	payment   **all = xmalloc((payments.n ? payments.n : 1) * sizeof(payment *));
	size_t		n = 0,
				i;
	long		charges = 0;
	buf_t	   *b = &c->resp->body;
	map_t		byref;
	int			first;

	map_init(&byref);
	for (i = 0; i < payments.nb; i++)
	{
		map_ent    *e;

		for (e = payments.b[i]; e; e = e->next)
			all[n++] = e->val;
	}
	qsort(all, n, sizeof(payment *), seqcmp);
	set_json(c, 200);
	buf_adds(b, "{\"payments\":[");
	first = 1;
	for (i = 0; i < n; i++)
	{
		payment    *p = all[i];

		if ((ref && strcmp(ref, p->reference) != 0) || (psp && strcmp(psp, kind_name[p->kind]) != 0) ||
			(pid && strcmp(pid, p->id) != 0))
			continue;
		if (!first)
			buf_adds(b, ",");
		first = 0;
		payment_json(b, p);
	}
	buf_adds(b, "],\"operations\":[");
	first = 1;
	for (i = 0; i < ledger_n; i++)
	{
		ledger_op  *l = &ledger[i];

		if ((ref && strcmp(ref, l->reference) != 0) || (psp && strcmp(psp, kind_name[l->kind]) != 0) ||
			(pid && strcmp(pid, l->payment) != 0))
			continue;
		if (l->op == OP_AUTHORIZE && strcmp(l->result, "succeeded") == 0)
		{
			long		k = (long) (intptr_t) map_get(&byref, l->reference);

			map_put(&byref, l->reference, (void *) (intptr_t) (k + 1));
			charges++;
		}
		if (!first)
			buf_adds(b, ",");
		first = 0;
		buf_printf(b, "{\"seq\":%ld,\"psp\":\"%s\",\"op\":\"%s\",\"result\":\"%s\",\"payment\":\"%s\","
				   "\"object\":\"%s\",\"amount\":%lld,\"currency\":\"%s\",\"reference\":",
				   l->seq, kind_name[l->kind], op_name[l->op], l->result, l->payment, l->object,
				   l->amount, l->currency);
		buf_json_cstr(b, l->reference);
		buf_adds(b, ",\"account\":");
		buf_json_cstr(b, l->account);
		buf_adds(b, ",\"idempotency_key\":");
		buf_json_cstr(b, l->idem_key[0] ? l->idem_key : NULL);
		buf_adds(b, ",\"detail\":");
		buf_json_cstr(b, l->detail);
		buf_printf(b, ",\"at\":%.3f}", l->at);
	}
	buf_printf(b, "],\"charges\":%ld,\"charges_by_reference\":{", charges);
	first = 1;
	for (i = 0; i < byref.nb; i++)
	{
		map_ent    *e;

		for (e = byref.b[i]; e; e = e->next)
		{
			if (!first)
				buf_adds(b, ",");
			first = 0;
			buf_json_cstr(b, e->key);
			buf_printf(b, ":%ld", (long) (intptr_t) e->val);
		}
	}
	buf_adds(b, "}}");
	map_clear(&byref, NULL);
	free(byref.b);
	free(all);
	free(ref);
	free(psp);
	free(pid);
}

static void
fault_json(buf_t *b, const fault *f)
{
	int			k,
				n = 0;
	long long	now = now_ms();

	buf_printf(b, "{\"id\":%d,\"type\":\"%s\",\"psp\":[", f->id, fault_name[f->type]);
	for (k = 0; k < K_N; k++)
		if (f->kinds & (1 << k))
			buf_printf(b, "%s\"%s\"", n++ ? "," : "", kind_name[k]);
	buf_printf(b, "],\"op\":\"%s\",\"account\":", f->op >= 0 ? op_name[f->op] : "any");
	buf_json_cstr(b, f->account[0] ? f->account : NULL);
	buf_printf(b, ",\"count\":%ld,\"probability\":%g,\"expires_in_ms\":%lld,\"applied\":%ld",
			   f->count, f->probability, f->expires ? f->expires - now : -1LL, f->applied);
	switch (f->type)
	{
		case F_LATENCY:
		case F_HOLD:
			buf_printf(b, ",\"ms\":%ld", f->ms);
			break;
		case F_ERROR:
			buf_printf(b, ",\"status\":%d", f->status);
			break;
		case F_DOWN:
			buf_printf(b, ",\"mode\":\"%s\"", f->refuse ? "refuse" : "503");
			break;
		case F_DECLINE:
			buf_printf(b, ",\"code\":\"%s\",\"amount\":%lld,\"min_amount\":%lld,\"max_amount\":%lld,\"method\":",
					   f->code, f->amount, f->min_amount, f->max_amount);
			buf_json_cstr(b, f->method[0] ? f->method : NULL);
			break;
	}
	if (f->type == F_HOLD || f->type == F_DROP || f->type == F_RESET || f->type == F_ERROR ||
		f->type == F_MALFORMED)
		buf_printf(b, ",\"charged\":%s", f->charged ? "true" : "false");
	buf_adds(b, "}");
}

/* one fault rule from JSON; NULL with a message on error */
static fault *
fault_parse(const jval *o, char *err, size_t errlen)
{
	fault	   *f;
	const char *type = jstr(o, "type");
	jval	   *v;
	long long	x;
	int			i;

	if (!o || o->t != J_OBJ)
	{
		snprintf(err, errlen, "a fault is a JSON object");
		return NULL;
	}
	if (!type)
	{
		snprintf(err, errlen, "\"type\" is required: latency, hold, drop, reset, error, malformed, decline or down");
		return NULL;
	}
	f = xcalloc(1, sizeof(fault));
	f->type = -1;
	for (i = 0; i < F_N; i++)
		if (strcmp(type, fault_name[i]) == 0)
			f->type = i;
	if (f->type < 0)
	{
		snprintf(err, errlen, "unknown fault type \"%.60s\"", type);
		free(f);
		return NULL;
	}
	f->kinds = (1 << K_N) - 1;
	f->op = -1;
	f->count = -1;
	f->probability = 1.0;
	f->amount = f->min_amount = f->max_amount = -1;
	f->charged = (f->type == F_HOLD || f->type == F_DROP || f->type == F_MALFORMED);
	f->status = f->type == F_DOWN ? 503 : 500;
	f->ms = f->type == F_HOLD ? 30000 : 0;

	v = jget(o, "psp");
	if (v)
	{
		const jval *one[1];
		const jval *const *list = one;
		size_t		n = 1;

		one[0] = v;
		if (v->t == J_ARR)
		{
			list = (const jval *const *) v->items;
			n = v->n;
		}
		f->kinds = 0;
		for (i = 0; i < (int) n; i++)
		{
			int			k,
						found = 0;

			if (list[i]->t != J_STR)
				goto bad_psp;
			if (strcmp(list[i]->s, "all") == 0 || strcmp(list[i]->s, "global") == 0)
			{
				f->kinds = (1 << K_N) - 1;
				continue;
			}
			for (k = 0; k < K_N; k++)
				if (strcmp(list[i]->s, kind_name[k]) == 0)
				{
					f->kinds |= 1 << k;
					found = 1;
				}
			if (!found)
				goto bad_psp;
		}
		if (!f->kinds)
			goto bad_psp;
	}
	if (jstr(o, "op") && strcmp(jstr(o, "op"), "any") != 0)
	{
		for (i = 0; i < OP_N; i++)
			if (strcmp(jstr(o, "op"), op_name[i]) == 0)
				f->op = i;
		if (f->op < 0)
		{
			snprintf(err, errlen, "unknown op \"%.60s\": authorize, capture, cancel, refund, lookup, token, create or any",
					 jstr(o, "op"));
			free(f);
			return NULL;
		}
	}
	copy(f->account, sizeof(f->account), jstr(o, "account"));
	if ((v = jget(o, "count")) || (v = jget(o, "next")))
	{
		if (!jint(v, &x) || x < 1)
		{
			snprintf(err, errlen, "\"count\" must be a positive integer");
			free(f);
			return NULL;
		}
		f->count = (long) x;
	}
	if ((v = jget(o, "probability")))
	{
		double		p = v->t == J_NUM ? strtod(v->s, NULL) : -1;

		if (p <= 0 || p > 1)
		{
			snprintf(err, errlen, "\"probability\" must be a number in (0, 1]");
			free(f);
			return NULL;
		}
		f->probability = p;
	}
	if ((v = jget(o, "duration_ms")))
	{
		if (!jint(v, &x) || x < 1)
		{
			snprintf(err, errlen, "\"duration_ms\" must be a positive integer");
			free(f);
			return NULL;
		}
		f->expires = now_ms() + x;
	}
	if ((v = jget(o, "ms")))
	{
		if (!jint(v, &x) || x < 0 || x > 3600000)
		{
			snprintf(err, errlen, "\"ms\" must be an integer from 0 to 3600000");
			free(f);
			return NULL;
		}
		f->ms = (long) x;
	}
	if (f->type == F_LATENCY && f->ms <= 0)
	{
		snprintf(err, errlen, "a latency fault needs \"ms\" > 0");
		free(f);
		return NULL;
	}
	if ((v = jget(o, "status")))
	{
		if (!jint(v, &x) || x < 500 || x > 599)
		{
			snprintf(err, errlen, "\"status\" must be a 5xx code");
			free(f);
			return NULL;
		}
		f->status = (int) x;
	}
	if ((v = jget(o, "charged")))
	{
		if (v->t != J_BOOL)
		{
			snprintf(err, errlen, "\"charged\" must be true or false");
			free(f);
			return NULL;
		}
		f->charged = v->b;
	}
	if (jstr(o, "mode"))
	{
		if (strcmp(jstr(o, "mode"), "refuse") == 0)
			f->refuse = 1;
		else if (strcmp(jstr(o, "mode"), "503") != 0)
		{
			snprintf(err, errlen, "\"mode\" is \"refuse\" or \"503\"");
			free(f);
			return NULL;
		}
	}
	if ((v = jget(o, "amount")) && !jint(v, &f->amount))
		goto bad_amount;
	if ((v = jget(o, "min_amount")) && !jint(v, &f->min_amount))
		goto bad_amount;
	if ((v = jget(o, "max_amount")) && !jint(v, &f->max_amount))
		goto bad_amount;
	copy(f->method, sizeof(f->method), jstr(o, "method"));
	copy(f->code, sizeof(f->code), jstr(o, "code") ? jstr(o, "code") : "generic_decline");
	return f;

bad_psp:
	snprintf(err, errlen, "\"psp\" is stripe, adyen, paypal, all, or an array of them");
	free(f);
	return NULL;
bad_amount:
	snprintf(err, errlen, "amounts are integers in minor units");
	free(f);
	return NULL;
}

static void
ctl_faults_post(ctx *c)
{
	char		err[200];
	jval	   *body = json_parse(c->req->body, c->req->body_len, err, sizeof(err));
	jval	   *list;
	fault	  **parsed;
	size_t		n,
				i;
	buf_t	   *b = &c->resp->body;

	if (!body)
	{
		ctl_error(c, 400, err);
		return;
	}
	list = body;
	if (body->t == J_OBJ && jget(body, "faults"))
		list = jget(body, "faults");
	n = list->t == J_ARR ? list->n : 1;
	parsed = xcalloc(n ? n : 1, sizeof(fault *));
	for (i = 0; i < n; i++)
	{
		parsed[i] = fault_parse(list->t == J_ARR ? list->items[i] : list, err, sizeof(err));
		if (!parsed[i])
		{
			size_t		j;

			for (j = 0; j < i; j++)
				free(parsed[j]);
			free(parsed);
			json_free(body);
			ctl_error(c, 400, err);
			return;
		}
	}
	set_json(c, 201);
	buf_adds(b, "{\"faults\":[");
	for (i = 0; i < n; i++)
	{
		fault	  **pp = &faults;

		parsed[i]->id = next_fault_id++;
		while (*pp)
			pp = &(*pp)->next;
		*pp = parsed[i];
		if (i)
			buf_adds(b, ",");
		fault_json(b, parsed[i]);
	}
	buf_adds(b, "]}");
	free(parsed);
	json_free(body);
}

static void
clear_faults(int id)
{
	fault	  **pp = &faults;

	while (*pp)
	{
		fault	   *f = *pp;

		if (id < 0 || f->id == id)
		{
			*pp = f->next;
			free(f);
		}
		else
			pp = &f->next;
	}
}

static void
ctl_stats(ctx *c)
{
	buf_t	   *b = &c->resp->body;
	int			k;
	long		total = 0;
	double		up = (now_ms() - started_ms) / 1000.0;

	for (k = 0; k < K_N; k++)
		total += stats[k].requests;
	set_json(c, 200);
	buf_printf(b, "{\"uptime_s\":%.3f,\"connections_open\":%ld,\"connections_total\":%ld,"
			   "\"requests\":%ld,\"control_requests\":%ld,\"in_flight\":%ld,\"payments\":%zu,"
			   "\"ledger_operations\":%zu,\"idempotency_keys\":%zu,\"faults_active\":",
			   up, conn_open, conn_total, total, control_requests, in_flight_n, payments.n,
			   ledger_n, idems.n);
	{
		long		nf = 0;
		fault	   *f;

		for (f = faults; f; f = f->next)
			nf++;
		buf_printf(b, "%ld", nf);
	}
	buf_adds(b, ",\"psp\":{");
	for (k = 0; k < K_N; k++)
	{
		kstats	   *s = &stats[k];

		buf_printf(b, "%s\"%s\":{\"requests\":%ld,\"2xx\":%ld,\"4xx\":%ld,\"5xx\":%ld,"
				   "\"no_answer\":%ld,\"faults\":%ld,\"replays\":%ld,\"conflicts\":%ld,"
				   "\"mismatches\":%ld,\"declines\":%ld,\"charges\":%ld,\"down\":%s}",
				   k ? "," : "", kind_name[k], s->requests, s->s2xx, s->s4xx, s->s5xx,
				   s->no_answer, s->faults, s->replays, s->conflicts, s->mismatches,
				   s->declines, s->charges, down_rule(k) ? "true" : "false");
	}
	buf_adds(b, "},\"ports\":{");
	buf_printf(b, "\"main\":%d,\"control\":%d,\"stripe\":%d,\"adyen\":%d,\"paypal\":%d}}",
			   ports[LISTEN_MAIN], ports[LISTEN_CONTROL], ports[LISTEN_STRIPE],
			   ports[LISTEN_ADYEN], ports[LISTEN_PAYPAL]);
}

static void
token_free(void *t)
{
	free(t);
}

static void
object_free(void *o)
{
	free(o);
}

static void
reset_all(int keep_faults)
{
	map_clear(&objects, object_free);
	map_clear(&payments, payment_free);
	map_clear(&idems, idem_free);
	map_clear(&tokens, token_free);
	ledger_n = 0;
	if (!keep_faults)
		clear_faults(-1);
	memset(stats, 0, sizeof(stats));
	control_requests = 0;
}

/* bytes of a "<name>_hex" or "<name>" member; caller frees; -1 if absent or bad */
static long
bytes_member(const jval *o, const char *name, uint8_t **out)
{
	char		hexname[64];
	const char *h;
	const char *s;

	snprintf(hexname, sizeof(hexname), "%s_hex", name);
	h = jstr(o, hexname);
	if (h)
	{
		long		n;

		*out = xmalloc(strlen(h) / 2 + 1);
		n = hex_decode(h, strlen(h), *out);
		if (n < 0)
		{
			free(*out);
			*out = NULL;
		}
		return n;
	}
	s = jstr(o, name);
	if (!s)
		return -1;
	*out = (uint8_t *) xstrndup(s, jget(o, name)->slen);
	return (long) jget(o, name)->slen;
}

/* POST /_control/hmac {"key"|"key_hex", "data"|"data_hex"} */
static void
ctl_hmac(ctx *c)
{
	char		err[200];
	jval	   *body = json_parse(c->req->body, c->req->body_len, err, sizeof(err));
	uint8_t    *key = NULL,
			   *data = NULL;
	long		kl,
				dl;
	uint8_t		mac[32],
				dig[32];
	char		hex[65],
				dhex[65];
	buf_t		b64;

	if (!body)
	{
		ctl_error(c, 400, err);
		return;
	}
	kl = bytes_member(body, "key", &key);
	dl = bytes_member(body, "data", &data);
	if (kl < 0 || dl < 0)
	{
		free(key);
		free(data);
		json_free(body);
		ctl_error(c, 400, "give \"key\" or \"key_hex\" and \"data\" or \"data_hex\" (hex must be valid)");
		return;
	}
	hmac_sha256(key, (size_t) kl, data, (size_t) dl, mac);
	sha256(data, (size_t) dl, dig);
	hex_encode(mac, 32, hex);
	hex_encode(dig, 32, dhex);
	buf_init(&b64);
	base64_encode(mac, 32, &b64);
	set_json(c, 200);
	buf_printf(&c->resp->body, "{\"hmac_sha256_hex\":\"%s\",\"hmac_sha256_base64\":\"%s\",\"sha256_hex\":\"%s\"}",
			   hex, b64.p, dhex);
	buf_free(&b64);
	free(key);
	free(data);
	json_free(body);
}

/* a Charge of a PaymentIntent as Stripe shows it (charge.* events) */
static void
stripe_charge_json(buf_t *b, const payment *p)
{
	char		cur[4];

	lower3(p->currency, cur);
	buf_printf(b, "{\"id\":\"%s\",\"object\":\"charge\",\"amount\":%lld,\"amount_captured\":%lld,"
			   "\"amount_refunded\":%lld,\"captured\":%s,\"currency\":\"%s\",\"livemode\":false,"
			   "\"metadata\":%s,\"payment_intent\":\"%s\",\"refunded\":%s,\"status\":\"%s\"}",
			   p->charge_id, p->authorized, p->captured, p->refunded, p->captured > 0 ? "true" : "false",
			   cur, p->metadata, p->id, p->captured > 0 && p->refunded == p->captured ? "true" : "false",
			   p->declined ? "failed" : "succeeded");
}

static void
webhook_stripe(ctx *c, const jval *in)
{
	const char *pi = jstr(in, "payment_intent");
	const char *refund_id = jstr(in, "refund");
	jval	   *chv = jget(in, "charge");
	int			as_charge = chv && chv->t == J_BOOL && chv->b;
	object	   *refund = NULL;
	const char *type = jstr(in, "type") ? jstr(in, "type") :
		refund_id ? "refund.updated" : as_charge ? "charge.refunded" : "payment_intent.succeeded";
	const char *secret = jstr(in, "secret") ? jstr(in, "secret") : stripe_whsec;
	jval	   *obj = jget(in, "object");
	jval	   *tsv = jget(in, "timestamp");
	long long	ts = unix_now();
	char		evt[40];
	buf_t		body,
				signed_payload,
				out;
	uint8_t		mac[32];
	char		hex[65];
	payment    *p = NULL;

	if (tsv && !jint(tsv, &ts))
	{
		ctl_error(c, 400, "\"timestamp\" must be an integer (unix seconds)");
		return;
	}
	if (refund_id)
	{
		refund = map_get(&objects, refund_id);
		if (!refund || refund->type != OB_REFUND || refund->p->kind != K_STRIPE)
		{
			ctl_error(c, 404, "no such Stripe refund");
			return;
		}
	}
	if (pi)
	{
		p = map_get(&payments, pi);
		if (!p || p->kind != K_STRIPE)
		{
			ctl_error(c, 404, "no such Stripe payment_intent");
			return;
		}
	}
	if (as_charge && (!p || !p->charge_id[0]))
	{
		ctl_error(c, 400, "\"charge\": true needs the \"payment_intent\" of a confirmed payment");
		return;
	}
	if (!p && !refund && (!obj || obj->t != J_OBJ))
	{
		ctl_error(c, 400, "give \"payment_intent\" (an id this server issued), \"refund\" or \"object\" (a JSON object)");
		return;
	}
	if (jstr(in, "id"))
		copy(evt, sizeof(evt), jstr(in, "id"));
	else
		make_id(evt, sizeof(evt), "evt_3", 24, ALNUM);
	buf_init(&body);
	buf_adds(&body, "{\"id\":");
	buf_json_cstr(&body, evt);
	buf_printf(&body, ",\"object\":\"event\",\"api_version\":\"2024-06-20\",\"created\":%lld,"
			   "\"data\":{\"object\":", ts);
	if (obj && obj->t == J_OBJ)
		json_write(&body, obj, 0);
	else if (refund)
		stripe_refund_json(&body, refund);
	else if (as_charge)
		stripe_charge_json(&body, p);
	else
		stripe_pi_json(&body, p);
	buf_adds(&body, "},\"livemode\":false,\"pending_webhooks\":1,"
			 "\"request\":{\"id\":null,\"idempotency_key\":null},\"type\":");
	buf_json_cstr(&body, type);
	buf_adds(&body, "}");

	buf_init(&signed_payload);
	buf_printf(&signed_payload, "%lld.", ts);
	buf_add(&signed_payload, body.p, body.len);
	hmac_sha256((const uint8_t *) secret, strlen(secret), signed_payload.p, signed_payload.len, mac);
	hex_encode(mac, 32, hex);

	buf_init(&out);
	set_json(c, 200);
	buf_adds(&c->resp->body, "{\"provider\":\"stripe\",\"event_id\":");
	buf_json_cstr(&c->resp->body, evt);
	buf_printf(&c->resp->body, ",\"timestamp\":%lld,\"headers\":{\"Content-Type\":\"application/json\","
			   "\"Stripe-Signature\":\"t=%lld,v1=%s\"},\"body\":", ts, ts, hex);
	buf_json_str(&c->resp->body, body.p, body.len);
	buf_adds(&c->resp->body, "}");
	buf_free(&out);
	buf_free(&body);
	buf_free(&signed_payload);
}

static void
webhook_adyen(ctx *c, const jval *in)
{
	const char *psp = jstr(in, "psp_reference");
	payment    *p = NULL;
	object	   *o = NULL;
	const char *event = jstr(in, "event_code");
	const char *orig = "";
	const char *merchant = "";
	const char *mref = "";
	char		cur[4] = "EUR";
	long long	value = 0;
	const char *success = "true";
	const char *keyhex = jstr(in, "hmac_key") ? jstr(in, "hmac_key") : adyen_hmac_hex;
	uint8_t		key[128];
	long		kl;
	uint8_t		mac[32];
	buf_t		sig,
				sstr,
				body;
	char		date[32];
	jval	   *v;

	if (!psp)
	{
		ctl_error(c, 400, "\"psp_reference\" is required");
		return;
	}
	p = map_get(&payments, psp);
	if (p && p->kind != K_ADYEN)
		p = NULL;
	if (!p)
	{
		o = map_get(&objects, psp);
		if (o && o->p->kind != K_ADYEN)
			o = NULL;
	}
	if (p)
	{
		merchant = p->account;
		mref = p->reference;
		memcpy(cur, p->currency, 4);
		value = p->amount;
		success = (p->authorized > 0) ? "true" : "false";
		if (!event)
			event = "AUTHORISATION";
	}
	else if (o)
	{
		orig = o->p->id;
		merchant = o->p->account;
		mref = o->reference[0] ? o->reference : o->p->reference;
		memcpy(cur, o->p->currency, 4);
		value = o->amount;
		if (!event)
			event = o->type == OB_CAPTURE ? "CAPTURE" : o->type == OB_CANCEL ? "CANCELLATION" : "REFUND";
	}
	if (!event)
		event = "AUTHORISATION";
	if (jstr(in, "original_reference"))
		orig = jstr(in, "original_reference");
	if (jstr(in, "merchant_account"))
		merchant = jstr(in, "merchant_account");
	if (jstr(in, "merchant_reference"))
		mref = jstr(in, "merchant_reference");
	if ((v = jget(in, "amount")))
	{
		if (!jint(jget(v, "value"), &value) || !norm_currency(jstr(v, "currency"), cur))
		{
			ctl_error(c, 400, "\"amount\" is {\"value\": integer, \"currency\": \"XXX\"}");
			return;
		}
	}
	if ((v = jget(in, "success")))
		success = (v->t == J_BOOL ? v->b : (v->t == J_STR && strcmp(v->s, "true") == 0)) ? "true" : "false";
	kl = strlen(keyhex) <= 256 ? hex_decode(keyhex, strlen(keyhex), key) : -1;
	if (kl <= 0)
	{
		ctl_error(c, 400, "\"hmac_key\" must be a hex string");
		return;
	}
	if (jstr(in, "event_date"))
		copy(date, sizeof(date), jstr(in, "event_date"));
	else
		iso_time(date, sizeof(date), unix_now());

	buf_init(&sstr);
	buf_printf(&sstr, "%s:%s:%s:%s:%lld:%s:%s:%s", psp, orig, merchant, mref, value, cur, event, success);
	hmac_sha256(key, (size_t) kl, sstr.p, sstr.len, mac);
	buf_init(&sig);
	base64_encode(mac, 32, &sig);

	buf_init(&body);
	buf_printf(&body, "{\"live\":\"false\",\"notificationItems\":[{\"NotificationRequestItem\":{"
			   "\"additionalData\":{\"hmacSignature\":\"%s\"},\"amount\":{\"currency\":\"%s\",\"value\":%lld},"
			   "\"eventCode\":", sig.p, cur, value);
	buf_json_cstr(&body, event);
	buf_adds(&body, ",\"eventDate\":");
	buf_json_cstr(&body, date);
	buf_adds(&body, ",\"merchantAccountCode\":");
	buf_json_cstr(&body, merchant);
	buf_adds(&body, ",\"merchantReference\":");
	buf_json_cstr(&body, mref);
	if (orig[0])
	{
		buf_adds(&body, ",\"originalReference\":");
		buf_json_cstr(&body, orig);
	}
	buf_adds(&body, ",\"paymentMethod\":\"visa\",\"pspReference\":");
	buf_json_cstr(&body, psp);
	buf_printf(&body, ",\"reason\":\"\",\"success\":\"%s\"}}]}", success);

	set_json(c, 200);
	buf_adds(&c->resp->body, "{\"provider\":\"adyen\",\"event_id\":");
	{
		buf_t		eid;

		buf_init(&eid);
		buf_printf(&eid, "%s:%s", psp, event);
		buf_json_cstr(&c->resp->body, eid.p);
		buf_free(&eid);
	}
	buf_printf(&c->resp->body, ",\"hmac_signature\":\"%s\",\"signing_string\":", sig.p);
	buf_json_str(&c->resp->body, sstr.p, sstr.len);
	buf_adds(&c->resp->body, ",\"headers\":{\"Content-Type\":\"application/json\"},\"body\":");
	buf_json_str(&c->resp->body, body.p, body.len);
	buf_adds(&c->resp->body, "}");
	buf_free(&sstr);
	buf_free(&sig);
	buf_free(&body);
}

static void
ctl_webhook(ctx *c)
{
	char		err[200];
	jval	   *in = json_parse(c->req->body, c->req->body_len, err, sizeof(err));
	const char *prov = jstr(in, "provider");

	if (!in || in->t != J_OBJ)
		ctl_error(c, 400, in ? "the body must be a JSON object" : err);
	else if (prov && strcmp(prov, "stripe") == 0)
		webhook_stripe(c, in);
	else if (prov && strcmp(prov, "adyen") == 0)
		webhook_adyen(c, in);
	else
		ctl_error(c, 400, "\"provider\" is \"stripe\" or \"adyen\" (PayPal signs webhooks with certificates, not supported)");
	json_free(in);
}

static void
ctl_config(ctx *c)
{
	char		err[200];
	jval	   *in = json_parse(c->req->body, c->req->body_len, err, sizeof(err));
	jval	   *v;
	long long	x;

	if (!in || in->t != J_OBJ)
	{
		ctl_error(c, 400, in ? "the body must be a JSON object" : err);
		json_free(in);
		return;
	}
	if ((v = jget(in, "paypal_token_ttl")))
	{
		if (!jint(v, &x) || x < 1)
		{
			ctl_error(c, 400, "\"paypal_token_ttl\" is a positive number of seconds");
			json_free(in);
			return;
		}
		paypal_token_ttl = (long) x;
	}
	if (jstr(in, "stripe_webhook_secret"))
		copy(stripe_whsec, sizeof(stripe_whsec), jstr(in, "stripe_webhook_secret"));
	if (jstr(in, "adyen_hmac_key"))
		copy(adyen_hmac_hex, sizeof(adyen_hmac_hex), jstr(in, "adyen_hmac_key"));
	set_json(c, 200);
	buf_printf(&c->resp->body, "{\"paypal_token_ttl\":%ld,\"stripe_webhook_secret\":", paypal_token_ttl);
	buf_json_cstr(&c->resp->body, stripe_whsec);
	buf_adds(&c->resp->body, ",\"adyen_hmac_key\":");
	buf_json_cstr(&c->resp->body, adyen_hmac_hex);
	buf_adds(&c->resp->body, "}");
	json_free(in);
}

static void
control_handle(ctx *c)
{
	const char *m = c->req->method;
	const char *what = c->nseg >= 2 ? c->seg[1] : "";

	if (strcmp(what, "health") == 0 && strcmp(m, "GET") == 0)
	{
		set_json(c, 200);
		buf_adds(&c->resp->body, "{\"ok\":true}");
	}
	else if (strcmp(what, "stats") == 0 && strcmp(m, "GET") == 0)
		ctl_stats(c);
	else if (strcmp(what, "ledger") == 0 && strcmp(m, "GET") == 0)
		ctl_ledger(c);
	else if (strcmp(what, "reset") == 0 && strcmp(m, "POST") == 0)
	{
		jval	   *in = c->req->body_len ? json_parse(c->req->body, c->req->body_len, NULL, 0) : NULL;
		jval	   *k = jget(in, "keep_faults");

		reset_all(k && k->t == J_BOOL && k->b);
		json_free(in);
		set_json(c, 200);
		buf_adds(&c->resp->body, "{\"reset\":true}");
	}
	else if (strcmp(what, "faults") == 0 && c->nseg == 2 && strcmp(m, "POST") == 0)
		ctl_faults_post(c);
	else if (strcmp(what, "faults") == 0 && c->nseg == 2 && strcmp(m, "GET") == 0)
	{
		fault	   *f;
		int			n = 0;

		set_json(c, 200);
		buf_adds(&c->resp->body, "{\"faults\":[");
		for (f = faults; f; f = f->next)
		{
			if (n++)
				buf_adds(&c->resp->body, ",");
			fault_json(&c->resp->body, f);
		}
		buf_adds(&c->resp->body, "]}");
	}
	else if (strcmp(what, "faults") == 0 && strcmp(m, "DELETE") == 0)
	{
		clear_faults(c->nseg >= 3 ? atoi(c->seg[2]) : -1);
		set_json(c, 200);
		buf_adds(&c->resp->body, "{\"deleted\":true}");
	}
	else if (strcmp(what, "webhook") == 0 && strcmp(m, "POST") == 0)
		ctl_webhook(c);
	else if (strcmp(what, "hmac") == 0 && strcmp(m, "POST") == 0)
		ctl_hmac(c);
	else if (strcmp(what, "config") == 0 && strcmp(m, "POST") == 0)
		ctl_config(c);
	else
		ctl_error(c, 404, "unknown control endpoint: see GET /_control/health, /stats, /ledger, /faults; "
				  "POST /reset, /faults, /webhook, /hmac, /config; DELETE /faults[/id]");
}

/* ---------------------------------------------------------------- setup */

void
psp_init(uint64_t seed)
{
	rng = seed ? seed : 88172645463325252ULL;
	map_init(&payments);
	map_init(&objects);
	map_init(&idems);
	map_init(&tokens);
	started_ms = now_ms();
}

void
psp_note_connection(int delta)
{
	conn_open += delta;
	if (delta > 0)
		conn_total += delta;
}

void
psp_set_ports(const int p[LISTEN_N])
{
	memcpy(ports, p, sizeof(ports));
}

void
psp_set_secrets(const char *whsec, const char *hmac_hex)
{
	if (whsec)
		copy(stripe_whsec, sizeof(stripe_whsec), whsec);
	if (hmac_hex)
		copy(adyen_hmac_hex, sizeof(adyen_hmac_hex), hmac_hex);
}

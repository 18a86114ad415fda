/*
 * util.c: growable buffers, a small JSON parser and writer, a string map.
 *
 * The JSON parser builds a tree of malloc'd nodes (json_free releases it);
 * numbers keep their literal text so that integer amounts are read exactly.
 * Allocation failure aborts the program: this is a test tool.
 */
#include <ctype.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "psp.h"

/* malloc that never returns NULL */
void *
xmalloc(size_t n)
{
	void	   *p = malloc(n ? n : 1);

	if (!p)
	{
		fputs("market-test-psp: out of memory\n", stderr);
		abort();
	}
	return p;
}

/* calloc that never returns NULL */
void *
xcalloc(size_t n, size_t m)
{
	void	   *p = calloc(n ? n : 1, m ? m : 1);

	if (!p)
	{
		fputs("market-test-psp: out of memory\n", stderr);
		abort();
	}
	return p;
}

/* realloc that never returns NULL */
void *
xrealloc(void *p, size_t n)
{
	void	   *q = realloc(p, n ? n : 1);

	if (!q)
	{
		fputs("market-test-psp: out of memory\n", stderr);
		abort();
	}
	return q;
}

/* copy of a string */
char *
xstrdup(const char *s)
{
	return xstrndup(s, strlen(s));
}

/* copy of n bytes as a string */
char *
xstrndup(const char *s, size_t n)
{
	char	   *p = xmalloc(n + 1);

	memcpy(p, s, n);
	p[n] = '\0';
	return p;
}

/* an empty buffer */
void
buf_init(buf_t *b)
{
	b->p = NULL;
	b->len = 0;
	b->cap = 0;
}

/* release a buffer's memory; it is empty afterwards */
void
buf_free(buf_t *b)
{
	free(b->p);
	buf_init(b);
}

/* room for extra more bytes plus a NUL */
void
buf_reserve(buf_t *b, size_t extra)
{
	if (b->len + extra + 1 > b->cap)
	{
		size_t		cap = b->cap ? b->cap : 256;

		while (cap < b->len + extra + 1)
			cap *= 2;
		b->p = xrealloc(b->p, cap);
		b->cap = cap;
	}
}

/* append bytes; the buffer stays NUL-terminated */
void
buf_add(buf_t *b, const void *data, size_t n)
{
	buf_reserve(b, n);
	memcpy(b->p + b->len, data, n);
	b->len += n;
	b->p[b->len] = '\0';
}

/* append a string */
void
buf_adds(buf_t *b, const char *s)
{
	buf_add(b, s, strlen(s));
}

/* append formatted text */
void
buf_printf(buf_t *b, const char *fmt,...)
{
	va_list		ap;
	int			n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	buf_reserve(b, (size_t) n);
	va_start(ap, fmt);
	vsnprintf(b->p + b->len, (size_t) n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t) n;
}

/* append a JSON string literal */
void
buf_json_str(buf_t *b, const char *s, size_t n)
{
	size_t		i;

	buf_reserve(b, n + 2);
	b->p[b->len++] = '"';
	for (i = 0; i < n; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c == '"' || c == '\\')
		{
			char		e[2] = {'\\', (char) c};

			buf_add(b, e, 2);
		}
		else if (c == '\n')
			buf_add(b, "\\n", 2);
		else if (c == '\r')
			buf_add(b, "\\r", 2);
		else if (c == '\t')
			buf_add(b, "\\t", 2);
		else if (c < 0x20)
			buf_printf(b, "\\u%04x", c);
		else
			buf_add(b, &s[i], 1);
	}
	buf_add(b, "\"", 1);
}

/* append a JSON string literal of a C string (null for NULL) */
void
buf_json_cstr(buf_t *b, const char *s)
{
	if (s)
		buf_json_str(b, s, strlen(s));
	else
		buf_adds(b, "null");
}

/* ---------------------------------------------------------------- JSON */

typedef struct jparser
{
	const char *s;
	const char *e;
	const char *err;
	int			depth;
} jparser;

static jval *jparse_value(jparser *p);

static void
jskip(jparser *p)
{
	while (p->s < p->e && (*p->s == ' ' || *p->s == '\t' || *p->s == '\n' || *p->s == '\r'))
		p->s++;
}

static jval *
jnew(jtype t)
{
	jval	   *v = xcalloc(1, sizeof(jval));

	v->t = t;
	return v;
}

/* append the UTF-8 encoding of a code point */
static void
utf8_put(buf_t *b, unsigned cp)
{
	char		o[4];

	if (cp < 0x80)
	{
		o[0] = (char) cp;
		buf_add(b, o, 1);
	}
	else if (cp < 0x800)
	{
		o[0] = (char) (0xc0 | cp >> 6);
		o[1] = (char) (0x80 | (cp & 0x3f));
		buf_add(b, o, 2);
	}
	else if (cp < 0x10000)
	{
		o[0] = (char) (0xe0 | cp >> 12);
		o[1] = (char) (0x80 | ((cp >> 6) & 0x3f));
		o[2] = (char) (0x80 | (cp & 0x3f));
		buf_add(b, o, 3);
	}
	else
	{
		o[0] = (char) (0xf0 | cp >> 18);
		o[1] = (char) (0x80 | ((cp >> 12) & 0x3f));
		o[2] = (char) (0x80 | ((cp >> 6) & 0x3f));
		o[3] = (char) (0x80 | (cp & 0x3f));
		buf_add(b, o, 4);
	}
}

static int
jhex4(const char *s, unsigned *out)
{
	unsigned	v = 0;
	int			i;

	for (i = 0; i < 4; i++)
	{
		char		c = s[i];

		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= (unsigned) (c - '0');
		else if (c >= 'a' && c <= 'f')
			v |= (unsigned) (c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			v |= (unsigned) (c - 'A' + 10);
		else
			return -1;
	}
	*out = v;
	return 0;
}

/* a string literal; p->s is at the opening quote */
static char *
jparse_string(jparser *p, size_t *len)
{
	buf_t		b;

	buf_init(&b);
	buf_reserve(&b, 16);
	p->s++;
	while (p->s < p->e && *p->s != '"')
	{
		unsigned char c = (unsigned char) *p->s;

		if (c < 0x20)
		{
			p->err = "control character in string";
			goto fail;
		}
		if (c != '\\')
		{
			buf_add(&b, p->s, 1);
			p->s++;
			continue;
		}
		if (p->s + 1 >= p->e)
			break;
		p->s++;
		switch (*p->s)
		{
			case '"':
				buf_add(&b, "\"", 1);
				break;
			case '\\':
				buf_add(&b, "\\", 1);
				break;
			case '/':
				buf_add(&b, "/", 1);
				break;
			case 'b':
				buf_add(&b, "\b", 1);
				break;
			case 'f':
				buf_add(&b, "\f", 1);
				break;
			case 'n':
				buf_add(&b, "\n", 1);
				break;
			case 'r':
				buf_add(&b, "\r", 1);
				break;
			case 't':
				buf_add(&b, "\t", 1);
				break;
			case 'u':
				{
					unsigned	cp,
								lo;

					if (p->e - p->s < 5 || jhex4(p->s + 1, &cp) < 0)
					{
						p->err = "bad \\u escape";
						goto fail;
					}
					p->s += 4;
					if (cp >= 0xd800 && cp < 0xdc00 && p->e - p->s >= 7 &&
						p->s[1] == '\\' && p->s[2] == 'u' && jhex4(p->s + 3, &lo) == 0 &&
						lo >= 0xdc00 && lo < 0xe000)
					{
						cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
						p->s += 6;
					}
					utf8_put(&b, cp);
					break;
				}
			default:
				p->err = "bad escape";
				goto fail;
		}
		p->s++;
	}
	if (p->s >= p->e)
	{
		p->err = "unterminated string";
		goto fail;
	}
	p->s++;
	*len = b.len;
	if (!b.p)
		return xstrdup("");
	return b.p;
fail:
	buf_free(&b);
	return NULL;
}

static jval *
jparse_number(jparser *p)
{
	const char *start = p->s;
	jval	   *v;

	if (p->s < p->e && *p->s == '-')
		p->s++;
	if (p->s >= p->e || !isdigit((unsigned char) *p->s))
	{
		p->err = "bad number";
		return NULL;
	}
	if (*p->s == '0')
		p->s++;
	else
		while (p->s < p->e && isdigit((unsigned char) *p->s))
			p->s++;
	if (p->s < p->e && *p->s == '.')
	{
		p->s++;
		if (p->s >= p->e || !isdigit((unsigned char) *p->s))
		{
			p->err = "bad number";
			return NULL;
		}
		while (p->s < p->e && isdigit((unsigned char) *p->s))
			p->s++;
	}
	if (p->s < p->e && (*p->s == 'e' || *p->s == 'E'))
	{
		p->s++;
		if (p->s < p->e && (*p->s == '+' || *p->s == '-'))
			p->s++;
		if (p->s >= p->e || !isdigit((unsigned char) *p->s))
		{
			p->err = "bad number";
			return NULL;
		}
		while (p->s < p->e && isdigit((unsigned char) *p->s))
			p->s++;
	}
	v = jnew(J_NUM);
	v->s = xstrndup(start, (size_t) (p->s - start));
	v->slen = (size_t) (p->s - start);
	return v;
}

static int
jlit(jparser *p, const char *lit)
{
	size_t		n = strlen(lit);

	if ((size_t) (p->e - p->s) >= n && memcmp(p->s, lit, n) == 0)
	{
		p->s += n;
		return 1;
	}
	return 0;
}

static jval *
jparse_value(jparser *p)
{
	jval	   *v;

	jskip(p);
	if (p->s >= p->e)
	{
		p->err = "unexpected end of input";
		return NULL;
	}
	if (++p->depth > 64)
	{
		p->err = "nested too deeply";
		return NULL;
	}
	switch (*p->s)
	{
		case '{':
		case '[':
			{
				int			obj = (*p->s == '{');
				size_t		cap = 0;

				v = jnew(obj ? J_OBJ : J_ARR);
				p->s++;
				jskip(p);
				if (p->s < p->e && *p->s == (obj ? '}' : ']'))
				{
					p->s++;
					break;
				}
				for (;;)
				{
					char	   *key = NULL;
					size_t		klen;
					jval	   *item;

					jskip(p);
					if (obj)
					{
						if (p->s >= p->e || *p->s != '"')
						{
							p->err = "expected a member name";
							json_free(v);
							return NULL;
						}
						key = jparse_string(p, &klen);
						if (!key)
						{
							json_free(v);
							return NULL;
						}
						jskip(p);
						if (p->s >= p->e || *p->s != ':')
						{
							p->err = "expected ':'";
							free(key);
							json_free(v);
							return NULL;
						}
						p->s++;
					}
					item = jparse_value(p);
					if (!item)
					{
						free(key);
						json_free(v);
						return NULL;
					}
					if (v->n == cap)
					{
						cap = cap ? cap * 2 : 4;
						v->items = xrealloc(v->items, cap * sizeof(jval *));
						if (obj)
							v->keys = xrealloc(v->keys, cap * sizeof(char *));
					}
					v->items[v->n] = item;
					if (obj)
						v->keys[v->n] = key;
					v->n++;
					jskip(p);
					if (p->s < p->e && *p->s == ',')
					{
						p->s++;
						continue;
					}
					if (p->s < p->e && *p->s == (obj ? '}' : ']'))
					{
						p->s++;
						break;
					}
					p->err = obj ? "expected ',' or '}'" : "expected ',' or ']'";
					json_free(v);
					return NULL;
				}
				break;
			}
		case '"':
			{
				size_t		len;
				char	   *s = jparse_string(p, &len);

				if (!s)
					return NULL;
				v = jnew(J_STR);
				v->s = s;
				v->slen = len;
				break;
			}
		case 't':
		case 'f':
		case 'n':
			if (jlit(p, "true"))
			{
				v = jnew(J_BOOL);
				v->b = 1;
			}
			else if (jlit(p, "false"))
				v = jnew(J_BOOL);
			else if (jlit(p, "null"))
				v = jnew(J_NULL);
			else
			{
				p->err = "unknown literal";
				return NULL;
			}
			break;
		default:
			v = jparse_number(p);
			if (!v)
				return NULL;
			break;
	}
	p->depth--;
	return v;
}

/* parse a whole document; NULL with a message in err on failure */
jval *
json_parse(const char *s, size_t n, char *err, size_t errlen)
{
	jparser		p = {s, s + n, NULL, 0};
	jval	   *v = jparse_value(&p);

	if (v)
	{
		jskip(&p);
		if (p.s != p.e)
		{
			json_free(v);
			v = NULL;
			p.err = "trailing characters after the document";
		}
	}
	if (!v && err)
		snprintf(err, errlen, "%s at offset %ld", p.err ? p.err : "parse error",
				 (long) (p.s - s));
	return v;
}

/* free a tree */
void
json_free(jval *v)
{
	size_t		i;

	if (!v)
		return;
	for (i = 0; i < v->n; i++)
	{
		json_free(v->items[i]);
		if (v->keys)
			free(v->keys[i]);
	}
	free(v->items);
	free(v->keys);
	free(v->s);
	free(v);
}

/* member of an object (the last one of that name), or NULL */
jval *
jget(const jval *obj, const char *key)
{
	size_t		i;

	if (!obj || obj->t != J_OBJ)
		return NULL;
	for (i = obj->n; i > 0; i--)
		if (strcmp(obj->keys[i - 1], key) == 0)
			return obj->items[i - 1];
	return NULL;
}

/* string member of an object, or NULL if absent or not a string */
const char *
jstr(const jval *obj, const char *key)
{
	jval	   *v = jget(obj, key);

	return (v && v->t == J_STR) ? v->s : NULL;
}

/* an integral JSON number into *out; 0 if v is not one */
int
jint(const jval *v, long long *out)
{
	char	   *end;
	long long	x;

	if (!v || v->t != J_NUM || strpbrk(v->s, ".eE"))
		return 0;
	x = strtoll(v->s, &end, 10);
	if (*end)
		return 0;
	*out = x;
	return 1;
}

static int
keycmp(const void *a, const void *b)
{
	const char *const *x = a;
	const char *const *y = b;

	return strcmp(*x, *y);
}

/* serialise a tree; sorted = 1 writes object members in name order */
void
json_write(buf_t *b, const jval *v, int sorted)
{
	size_t		i;

	switch (v->t)
	{
		case J_NULL:
			buf_adds(b, "null");
			break;
		case J_BOOL:
			buf_adds(b, v->b ? "true" : "false");
			break;
		case J_NUM:
			buf_add(b, v->s, v->slen);
			break;
		case J_STR:
			buf_json_str(b, v->s, v->slen);
			break;
		case J_ARR:
			buf_add(b, "[", 1);
			for (i = 0; i < v->n; i++)
			{
				if (i)
					buf_add(b, ",", 1);
				json_write(b, v->items[i], sorted);
			}
			buf_add(b, "]", 1);
			break;
		case J_OBJ:
			{
				const char **order = xmalloc((v->n ? v->n : 1) * sizeof(char *));

				for (i = 0; i < v->n; i++)
					order[i] = v->keys[i];
				if (sorted)
					qsort(order, v->n, sizeof(char *), keycmp);
				buf_add(b, "{", 1);
				for (i = 0; i < v->n; i++)
				{
					if (i)
						buf_add(b, ",", 1);
					buf_json_cstr(b, order[i]);
					buf_add(b, ":", 1);
					json_write(b, jget(v, order[i]), sorted);
				}
				buf_add(b, "}", 1);
				free(order);
				break;
			}
	}
}

/* ---------------------------------------------------------------- map */

static size_t
strhash(const char *s)
{
	size_t		h = 1469598103934665603ULL;

	while (*s)
		h = (h ^ (unsigned char) *s++) * 1099511628211ULL;
	return h;
}

/* an empty map */
void
map_init(map_t *m)
{
	m->nb = 64;
	m->n = 0;
	m->b = xcalloc(m->nb, sizeof(map_ent *));
}

/* value stored under key, or NULL */
void *
map_get(const map_t *m, const char *key)
{
	map_ent    *e;

	for (e = m->b[strhash(key) & (m->nb - 1)]; e; e = e->next)
		if (strcmp(e->key, key) == 0)
			return e->val;
	return NULL;
}

/* store val under key, replacing an older value */
void
map_put(map_t *m, const char *key, void *val)
{
	size_t		h = strhash(key);
	map_ent    *e;

	for (e = m->b[h & (m->nb - 1)]; e; e = e->next)
		if (strcmp(e->key, key) == 0)
		{
			e->val = val;
			return;
		}
	if (m->n >= m->nb)
	{
		size_t		nb = m->nb * 2;
		map_ent   **nbk = xcalloc(nb, sizeof(map_ent *));
		size_t		i;

		for (i = 0; i < m->nb; i++)
			while (m->b[i])
			{
				map_ent    *x = m->b[i];

				m->b[i] = x->next;
				x->next = nbk[strhash(x->key) & (nb - 1)];
				nbk[strhash(x->key) & (nb - 1)] = x;
			}
		free(m->b);
		m->b = nbk;
		m->nb = nb;
	}
	e = xmalloc(sizeof(map_ent));
	e->key = xstrdup(key);
	e->val = val;
	e->next = m->b[h & (m->nb - 1)];
	m->b[h & (m->nb - 1)] = e;
	m->n++;
}

/* remove key; returns its value or NULL */
void *
map_del(map_t *m, const char *key)
{
	map_ent   **pp;

	for (pp = &m->b[strhash(key) & (m->nb - 1)]; *pp; pp = &(*pp)->next)
		if (strcmp((*pp)->key, key) == 0)
		{
			map_ent    *x = *pp;
			void	   *val = x->val;

			*pp = x->next;
			free(x->key);
			free(x);
			m->n--;
			return val;
		}
	return NULL;
}

/* remove everything, freeing the values with freeval (if not NULL) */
void
map_clear(map_t *m, void (*freeval) (void *))
{
	size_t		i;

	for (i = 0; i < m->nb; i++)
		while (m->b[i])
		{
			map_ent    *x = m->b[i];

			m->b[i] = x->next;
			if (freeval)
				freeval(x->val);
			free(x->key);
			free(x);
		}
	m->n = 0;
}

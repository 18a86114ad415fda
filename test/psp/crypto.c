/*
 * crypto.c: SHA-256 (FIPS 180-4), HMAC-SHA256 (RFC 2104), hex and base64.
 *
 * Written from the standards, libc only.  crypto_selftest() checks the
 * SHA-256 examples of FIPS 180 and the HMAC-SHA256 cases of RFC 4231;
 * `market-test-psp --self-test` runs it.  No state, no locking.
 */
#include <string.h>

#include "psp.h"

static const uint32_t K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2
};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

/* one 64-byte block into the state (FIPS 180-4, 6.2.2) */
static void
sha256_block(uint32_t h[8], const uint8_t *p)
{
	uint32_t	w[64];
	uint32_t	a, b, c, d, e, f, g, hh;
	int			t;

	for (t = 0; t < 16; t++)
		w[t] = ((uint32_t) p[4 * t] << 24) | ((uint32_t) p[4 * t + 1] << 16) |
			((uint32_t) p[4 * t + 2] << 8) | (uint32_t) p[4 * t + 3];
	for (t = 16; t < 64; t++)
	{
		uint32_t	s0 = ROTR(w[t - 15], 7) ^ ROTR(w[t - 15], 18) ^ (w[t - 15] >> 3);
		uint32_t	s1 = ROTR(w[t - 2], 17) ^ ROTR(w[t - 2], 19) ^ (w[t - 2] >> 10);

		w[t] = w[t - 16] + s0 + w[t - 7] + s1;
	}
	a = h[0]; b = h[1]; c = h[2]; d = h[3];
	e = h[4]; f = h[5]; g = h[6]; hh = h[7];
	for (t = 0; t < 64; t++)
	{
		uint32_t	S1 = ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25);
		uint32_t	ch = (e & f) ^ (~e & g);
		uint32_t	t1 = hh + S1 + ch + K[t] + w[t];
		uint32_t	S0 = ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22);
		uint32_t	maj = (a & b) ^ (a & c) ^ (b & c);
		uint32_t	t2 = S0 + maj;

		hh = g; g = f; f = e; e = d + t1;
		d = c; c = b; b = a; a = t1 + t2;
	}
	h[0] += a; h[1] += b; h[2] += c; h[3] += d;
	h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

/* start a digest with the initial hash value of FIPS 180-4, 5.3.3 */
void
sha256_init(sha256_ctx *c)
{
	static const uint32_t iv[8] = {
		0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
		0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19
	};

	memcpy(c->h, iv, sizeof(iv));
	c->bits = 0;
	c->used = 0;
}

/* feed bytes */
void
sha256_update(sha256_ctx *c, const void *data, size_t n)
{
	const uint8_t *p = data;

	c->bits += (uint64_t) n * 8;
	if (c->used)
	{
		size_t		take = 64 - c->used;

		if (take > n)
			take = n;
		memcpy(c->blk + c->used, p, take);
		c->used += take;
		p += take;
		n -= take;
		if (c->used < 64)
			return;
		sha256_block(c->h, c->blk);
		c->used = 0;
	}
	while (n >= 64)
	{
		sha256_block(c->h, p);
		p += 64;
		n -= 64;
	}
	memcpy(c->blk, p, n);
	c->used = n;
}

/* pad (FIPS 180-4, 5.1.1) and write the 32-byte digest */
void
sha256_final(sha256_ctx *c, uint8_t out[32])
{
	uint64_t	bits = c->bits;
	int			i;

	c->blk[c->used++] = 0x80;
	if (c->used > 56)
	{
		memset(c->blk + c->used, 0, 64 - c->used);
		sha256_block(c->h, c->blk);
		c->used = 0;
	}
	memset(c->blk + c->used, 0, 56 - c->used);
	for (i = 0; i < 8; i++)
		c->blk[56 + i] = (uint8_t) (bits >> (56 - 8 * i));
	sha256_block(c->h, c->blk);
	for (i = 0; i < 8; i++)
	{
		out[4 * i] = (uint8_t) (c->h[i] >> 24);
		out[4 * i + 1] = (uint8_t) (c->h[i] >> 16);
		out[4 * i + 2] = (uint8_t) (c->h[i] >> 8);
		out[4 * i + 3] = (uint8_t) c->h[i];
	}
}

/* digest of one buffer */
void
sha256(const void *data, size_t n, uint8_t out[32])
{
	sha256_ctx	c;

	sha256_init(&c);
	sha256_update(&c, data, n);
	sha256_final(&c, out);
}

/* HMAC-SHA256 (RFC 2104): H((K ^ opad) || H((K ^ ipad) || msg)) */
void
hmac_sha256(const uint8_t *key, size_t klen, const void *msg, size_t mlen, uint8_t out[32])
{
	uint8_t		k[64];
	uint8_t		pad[64];
	uint8_t		inner[32];
	sha256_ctx	c;
	int			i;

	memset(k, 0, sizeof(k));
	if (klen > 64)
		sha256(key, klen, k);
	else
		memcpy(k, key, klen);

	for (i = 0; i < 64; i++)
		pad[i] = k[i] ^ 0x36;
	sha256_init(&c);
	sha256_update(&c, pad, 64);
	sha256_update(&c, msg, mlen);
	sha256_final(&c, inner);

	for (i = 0; i < 64; i++)
		pad[i] = k[i] ^ 0x5c;
	sha256_init(&c);
	sha256_update(&c, pad, 64);
	sha256_update(&c, inner, 32);
	sha256_final(&c, out);
}

/* lower-case hex; out holds 2n+1 bytes */
void
hex_encode(const uint8_t *in, size_t n, char *out)
{
	static const char digits[] = "0123456789abcdef";
	size_t		i;

	for (i = 0; i < n; i++)
	{
		out[2 * i] = digits[in[i] >> 4];
		out[2 * i + 1] = digits[in[i] & 15];
	}
	out[2 * n] = '\0';
}

static int
hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* hex to bytes; out holds n/2 bytes; -1 on a bad digit or odd length */
long
hex_decode(const char *in, size_t n, uint8_t *out)
{
	size_t		i;

	if (n % 2)
		return -1;
	for (i = 0; i < n / 2; i++)
	{
		int			hi = hexval(in[2 * i]);
		int			lo = hexval(in[2 * i + 1]);

		if (hi < 0 || lo < 0)
			return -1;
		out[i] = (uint8_t) (hi << 4 | lo);
	}
	return (long) (n / 2);
}

static const char b64[] =
"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* standard base64 with padding (RFC 4648, 4) */
void
base64_encode(const uint8_t *in, size_t n, buf_t *out)
{
	size_t		i;

	for (i = 0; i + 2 < n; i += 3)
	{
		uint32_t	v = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8 | in[i + 2];
		char		q[4] = {b64[v >> 18], b64[(v >> 12) & 63], b64[(v >> 6) & 63], b64[v & 63]};

		buf_add(out, q, 4);
	}
	if (n - i == 1)
	{
		uint32_t	v = (uint32_t) in[i] << 16;
		char		q[4] = {b64[v >> 18], b64[(v >> 12) & 63], '=', '='};

		buf_add(out, q, 4);
	}
	else if (n - i == 2)
	{
		uint32_t	v = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8;
		char		q[4] = {b64[v >> 18], b64[(v >> 12) & 63], b64[(v >> 6) & 63], '='};

		buf_add(out, q, 4);
	}
}

/* base64 to bytes (out holds 3n/4 bytes); -1 on bad input */
long
base64_decode(const char *in, size_t n, uint8_t *out)
{
	uint32_t	acc = 0;
	int			bits = 0;
	long		len = 0;
	size_t		i;

	for (i = 0; i < n; i++)
	{
		const char *q;

		if (in[i] == '=')
			break;
		q = memchr(b64, in[i], 64);
		if (!q || in[i] == '\0')
			return -1;
		acc = acc << 6 | (uint32_t) (q - b64);
		bits += 6;
		if (bits >= 8)
		{
			bits -= 8;
			out[len++] = (uint8_t) (acc >> bits);
		}
	}
	return len;
}

/* compare a digest with an expected hex string, printing the outcome */
static int
check(FILE *log, const char *name, const uint8_t *got, size_t n, const char *want)
{
	char		hex[65];

	hex_encode(got, n, hex);
	if (strcmp(hex, want) == 0)
	{
		if (log)
			fprintf(log, "ok   %s\n", name);
		return 0;
	}
	if (log)
		fprintf(log, "FAIL %s: got %s want %s\n", name, hex, want);
	return 1;
}

/*
 * The FIPS 180 SHA-256 examples (one block, two blocks, 896-bit message,
 * empty message, one million 'a') and the seven RFC 4231 HMAC-SHA256 cases,
 * plus a split-update check.  Returns the number of failures.
 */
int
crypto_selftest(FILE *log)
{
	uint8_t		d[32];
	uint8_t		key[131];
	uint8_t		data[152];
	sha256_ctx	c;
	int			fail = 0;
	int			i;
	static const char *m896 =
		"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmno"
		"ijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu";
	static const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";

	sha256("abc", 3, d);
	fail += check(log, "sha256 abc", d, 32,
				  "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
	sha256("", 0, d);
	fail += check(log, "sha256 empty", d, 32,
				  "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
	sha256(m448, strlen(m448), d);
	fail += check(log, "sha256 448 bits", d, 32,
				  "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
	sha256(m896, strlen(m896), d);
	fail += check(log, "sha256 896 bits", d, 32,
				  "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
	memset(data, 'a', 100);
	sha256_init(&c);
	for (i = 0; i < 10000; i++)
		sha256_update(&c, data, 100);
	sha256_final(&c, d);
	fail += check(log, "sha256 million a", d, 32,
				  "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
	/* the same 896-bit message fed in odd pieces */
	sha256_init(&c);
	for (i = 0; i < (int) strlen(m896); i += 7)
		sha256_update(&c, m896 + i, strlen(m896) - i < 7 ? strlen(m896) - i : 7);
	sha256_final(&c, d);
	fail += check(log, "sha256 896 bits in pieces", d, 32,
				  "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");

	/* RFC 4231, 4.2 - 4.8 */
	memset(key, 0x0b, 20);
	hmac_sha256(key, 20, "Hi There", 8, d);
	fail += check(log, "hmac rfc4231 case 1", d, 32,
				  "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
	hmac_sha256((const uint8_t *) "Jefe", 4, "what do ya want for nothing?", 28, d);
	fail += check(log, "hmac rfc4231 case 2", d, 32,
				  "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
	memset(key, 0xaa, 20);
	memset(data, 0xdd, 50);
	hmac_sha256(key, 20, data, 50, d);
	fail += check(log, "hmac rfc4231 case 3", d, 32,
				  "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe");
	for (i = 0; i < 25; i++)
		key[i] = (uint8_t) (i + 1);
	memset(data, 0xcd, 50);
	hmac_sha256(key, 25, data, 50, d);
	fail += check(log, "hmac rfc4231 case 4", d, 32,
				  "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b");
	memset(key, 0x0c, 20);
	hmac_sha256(key, 20, "Test With Truncation", 20, d);
	fail += check(log, "hmac rfc4231 case 5 (128 bits)", d, 16,
				  "a3b6167473100ee06e0c796c2955552b");
	memset(key, 0xaa, 131);
	hmac_sha256(key, 131, "Test Using Larger Than Block-Size Key - Hash Key First", 54, d);
	fail += check(log, "hmac rfc4231 case 6", d, 32,
				  "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
	{
		const char *m7 = "This is a test using a larger than block-size key and a larger "
			"than block-size data. The key needs to be hashed before being used by "
			"the HMAC algorithm.";

		hmac_sha256(key, 131, m7, strlen(m7), d);
		fail += check(log, "hmac rfc4231 case 7", d, 32,
					  "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2");
	}

	/* base64 round trip (RFC 4648, 10) */
	{
		buf_t		b;
		uint8_t		back[8];
		long		n;

		buf_init(&b);
		base64_encode((const uint8_t *) "foobar", 6, &b);
		buf_add(&b, "", 1);
		n = base64_decode(b.p, b.len - 1, back);
		if (strcmp(b.p, "Zm9vYmFy") != 0 || n != 6 || memcmp(back, "foobar", 6) != 0)
		{
			if (log)
				fprintf(log, "FAIL base64 foobar: %s\n", b.p);
			fail++;
		}
		else if (log)
			fprintf(log, "ok   base64 foobar\n");
		buf_free(&b);
	}
	return fail;
}

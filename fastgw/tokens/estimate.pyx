# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Prompt-token estimate in a few microseconds, without running BPE.

Exact BPE (tiktoken) costs 150-250 µs for a 1,000-token prompt; admission control and rate limiting need a
figure before the request is forwarded, so this module estimates it from one pass over the bytes.

The text is cut into runs the way tiktoken's pre-tokenizer cuts it, and each run is priced:
  letters (a word; accented Latin / Greek / Cyrillic letters included)  by length, from a table measured on
           the Python language reference: words up to 10 letters are ~1 token, longer ones more; plus a
           little per non-ASCII letter and per camelCase hump
  digits   exactly ceil(n / 3) (both encodings split numbers in groups of up to 3)
  symbols  ~1 for the first + a fraction per further symbol (common pairs like `),` `");` merge)
  spaces   a single space is free (it rides on the next word); longer runs and newline runs ~1
  CJK, Hangul, other 3-byte and 4-byte (emoji) characters: a cost per character
Costs are in hundredths of a token, calibrated per encoding (cl100k_base and o200k_base differ mostly on
non-Latin scripts) against tiktoken on tests/data/tokens; docs/token-estimate.md has the measured errors
and tests/data/tokens/measure.py reproduces them.

The runs are not walked byte by byte: the price of every run is a sum of per-position increments, so 64 bytes
at a time become bit masks (SIMD compares) and the increments popcounts (see the comment above the C core).
About 0.3 ns per byte; tests/core/test_tokens.py checks it against the byte-at-a-time model in Python.

estimate_chat_tokens() walks the raw JSON of a request once, without building Python objects, and prices the
content strings with the same estimator (JSON escapes decoded on the fly), plus OpenAI's framing overhead.
"""
from fastgw.protocol.jsonskip cimport put_utf8, skip_scalar, skip_string, skip_value, skip_ws
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memcpy

ctypedef unsigned char uchar

# The estimator's core is C (below): the model is a sum over runs, and every run's price can be written as a
# sum of per-position increments that depend only on a few neighbouring bytes (a word's k-th letter adds
# WORD[k] - WORD[k-1], a digit run's 1st, 4th, 7th... digit adds one token, ...). So the text is cut into
# 64-byte blocks, each byte class becomes a 64-bit mask (SSE2 compares), and every increment is a popcount of
# shifted-and-ANDed masks, with the previous block's masks carried in for the shifts. No branch per byte:
# ~0.3 ns/byte against ~1.3 for the byte-at-a-time state machine it replaces, and the same integer totals.
# Continuation bytes (and bytes never valid in UTF-8) cost nothing and never end a run, i.e. they are
# transparent: they are dropped while the text is copied into the 64-byte staging buffer, so a multi-byte
# character is one position, classified by its lead byte.
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif

    enum {
        K_LOWER = 0, K_UPPER, K_DIGIT, K_SPACE, K_NL, K_PUNCT,
        K_STOP,   /* '"' and '\\\\': punctuation in text, string end / escape inside JSON */
        K_C2,     /* 2-byte lead U+0080-U+00BF: Latin-1 symbols (degree, times, guillemets...): punctuation */
        K_U2L,    /* 2-byte lead U+00C0-U+027F: accented Latin letters */
        K_U2X,    /* 2-byte lead U+0280-U+07FF: IPA, Greek, Cyrillic, Armenian, Hebrew, Arabic... */
        K_CJK,    /* 3-byte lead U+3000-U+9FFF: CJK punctuation, kana, ideographs */
        K_HANG,   /* 3-byte lead U+A000-U+DFFF: Hangul (and rarer scripts) */
        K_O3,     /* other 3-byte: Indic, Thai, general punctuation, math, fullwidth forms */
        K_O4,     /* 4-byte: emoji, rare ideographs */
        K_CONT,   /* continuation byte */
        K_BAD     /* never valid in UTF-8 */
    };

    static unsigned char fgw_cls[256];
    /* 1 for the bytes that take a position (everything but continuation and invalid bytes) */
    static unsigned char fgw_keep[256];

    typedef struct {          /* hundredths of a token */
        int camel;            /* per lower->UPPER change inside a word */
        int u2l;              /* per accented Latin letter in a word */
        int u2x;              /* per Greek/Cyrillic/... letter in a word */
        int punc;             /* first symbol of a run */
        int punc_more;        /* each further symbol of the run */
        int spaces;           /* a run of 2+ spaces/tabs */
        int newlines;         /* a whitespace run containing a newline */
        int cjk, hangul, other3, char4;
    } fgw_prices;

    typedef struct {          /* what one block hands to the next */
        const fgw_prices *P;
        long long total;      /* hundredths of a token */
        /* the previous block's masks (bit 63 = the position just before this block) */
        uint64_t hW, hA2, hA4, hLOWX, hD, hE, hWS, hPRE, hNLR, hP;
    } fgw_state;

    typedef struct {
        fgw_state s;
        int fill;             /* bytes waiting in buf */
        unsigned char buf[64] __attribute__((aligned(16)));
    } fgw_est;

    /* Mean tokens of " word" by word length (letters), measured on the Python language reference
       (pydoc_data.topics) with both encodings (they agree within 0.02 up to 16 letters); beyond: 0.2 per
       letter. WORD[L] for L < 17, else 20 * L. */
    static const int FGW_WORD[17] = {0, 100, 100, 100, 100, 100, 100, 105, 110, 110, 110, 125, 145, 150, 160,
                                     220, 260};
    /* FGW_D[k] = inc(k) - inc(k-1), inc(k) = what the k-th letter of a word adds (k >= 2):
       inc(k) = WORD[k] - WORD[k-1] up to 16, 20*17 - WORD[16] at 17, 20 beyond; so 0 up to 6, then
       inc = 5 5 0 0 15 20 5 10 60 40 80 20 for k = 7..18. Constants, so that the unrolled steps below fold
       them (a zero step only narrows the mask); the run-model tests check every word length. */
    static const int FGW_D[19] = {0, 0, 0, 0, 0, 0, 0, 5, 0, -5, 0, 15, 5, -15, 5, 50, -20, 40, -60};

    static void fgw_init(void) {
        int c;
        for (c = 0; c < 256; c++) {
            unsigned char v;
            if (c >= 97 && c <= 122) v = K_LOWER;
            else if (c >= 65 && c <= 90) v = K_UPPER;
            else if (c >= 48 && c <= 57) v = K_DIGIT;
            else if (c == 32 || c == 9) v = K_SPACE;
            else if (c == 10 || c == 13) v = K_NL;
            else if (c == 34 || c == 92) v = K_STOP;
            else if (c < 128) v = K_PUNCT;
            else if (c < 0xC0) v = K_CONT;
            else if (c == 0xC2) v = K_C2;
            else if (c >= 0xC3 && c <= 0xC9) v = K_U2L;
            else if (c >= 0xCA && c <= 0xDF) v = K_U2X;
            else if (c >= 0xE3 && c <= 0xE9) v = K_CJK;
            else if (c >= 0xEA && c <= 0xED) v = K_HANG;
            else if (c >= 0xE0 && c <= 0xEF) v = K_O3;
            else if (c >= 0xF0 && c <= 0xF4) v = K_O4;
            else v = K_BAD;
            fgw_cls[c] = v;
            fgw_keep[c] = v != K_CONT && v != K_BAD;
        }
    }

    /* x shifted towards later positions by s (1..63), the previous block's hx filling the low bits */
    #define FGW_SH(x, hx, s) (((x) << (s)) | ((hx) >> (64 - (s))))

    /* Masks of the first 16 * lanes bytes (the others 0): letters, lowercase, digits, space/tab, newline,
       bytes >= 0x80 */
    static inline __attribute__((always_inline)) void fgw_classify(
            const unsigned char *p, int lanes, uint64_t *let, uint64_t *low, uint64_t *dig, uint64_t *sp,
            uint64_t *nl, uint64_t *hi) {
    #if defined(__SSE2__)
        uint64_t L = 0, Lo = 0, D = 0, S = 0, N = 0, H = 0;
        const __m128i x20 = _mm_set1_epi8(0x20);
        /* c in [lo, lo + n) <=> (signed char)(c + 0x80 - lo) < (signed char)(0x80 + n) */
        const __m128i offa = _mm_set1_epi8((char)(0x80 - 'a')), lim26 = _mm_set1_epi8((char)(0x80 + 26));
        const __m128i off0 = _mm_set1_epi8((char)(0x80 - '0')), lim10 = _mm_set1_epi8((char)(0x80 + 10));
        const __m128i c32 = _mm_set1_epi8(32), c9 = _mm_set1_epi8(9), c10 = _mm_set1_epi8(10),
                      c13 = _mm_set1_epi8(13);
        int k;
        for (k = 0; k < lanes; k++) {
            __m128i b = _mm_loadu_si128((const __m128i *)(p + 16 * k));
            __m128i isl = _mm_cmplt_epi8(_mm_add_epi8(_mm_or_si128(b, x20), offa), lim26);
            __m128i islo = _mm_cmplt_epi8(_mm_add_epi8(b, offa), lim26);
            __m128i isd = _mm_cmplt_epi8(_mm_add_epi8(b, off0), lim10);
            __m128i iss = _mm_or_si128(_mm_cmpeq_epi8(b, c32), _mm_cmpeq_epi8(b, c9));
            __m128i isn = _mm_or_si128(_mm_cmpeq_epi8(b, c10), _mm_cmpeq_epi8(b, c13));
            L |= (uint64_t)(unsigned)_mm_movemask_epi8(isl) << (16 * k);
            Lo |= (uint64_t)(unsigned)_mm_movemask_epi8(islo) << (16 * k);
            D |= (uint64_t)(unsigned)_mm_movemask_epi8(isd) << (16 * k);
            S |= (uint64_t)(unsigned)_mm_movemask_epi8(iss) << (16 * k);
            N |= (uint64_t)(unsigned)_mm_movemask_epi8(isn) << (16 * k);
            H |= (uint64_t)(unsigned)_mm_movemask_epi8(b) << (16 * k);
        }
        *let = L; *low = Lo; *dig = D; *sp = S; *nl = N; *hi = H;
    #else
        uint64_t L = 0, Lo = 0, D = 0, S = 0, N = 0, H = 0, bit;
        int j;
        for (j = 0; j < 16 * lanes; j++) {
            unsigned char k = fgw_cls[p[j]];
            bit = 1ULL << j;
            if (k <= K_UPPER) { L |= bit; if (k == K_LOWER) Lo |= bit; }
            else if (k == K_DIGIT) D |= bit;
            else if (k == K_SPACE) S |= bit;
            else if (k == K_NL) N |= bit;
            else if (p[j] >= 0x80) H |= bit;
        }
        *let = L; *low = Lo; *dig = D; *sp = S; *nl = N; *hi = H;
    #endif
    }

    #define FGW_PC(x) ((long long)__builtin_popcountll(x))

    /* Masks of the lead bytes >= 0x80 by class (only blocks that hold some; continuation bytes are gone). */
    typedef struct { uint64_t c2, u2l, u2x, cjk, hang, o3, o4; } fgw_hi;

    static inline __attribute__((always_inline)) void fgw_classify_hi(const unsigned char *p, int lanes,
                                                                      fgw_hi *h) {
    #if defined(__SSE2__)
        #define FGW_IN(b, lo, n) _mm_movemask_epi8(_mm_cmplt_epi8(_mm_add_epi8(b, _mm_set1_epi8((char)(0x80 - (lo)))), \
                                                                  _mm_set1_epi8((char)(0x80 + (n)))))
        uint64_t c2 = 0, u2l = 0, u2x = 0, cjk = 0, hang = 0, b3 = 0, o4 = 0;
        int k;
        for (k = 0; k < lanes; k++) {
            __m128i b = _mm_loadu_si128((const __m128i *)(p + 16 * k));
            c2 |= (uint64_t)(unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(b, _mm_set1_epi8((char)0xC2))) << (16 * k);
            u2l |= (uint64_t)(unsigned)FGW_IN(b, 0xC3, 7) << (16 * k);
            u2x |= (uint64_t)(unsigned)FGW_IN(b, 0xCA, 22) << (16 * k);
            cjk |= (uint64_t)(unsigned)FGW_IN(b, 0xE3, 7) << (16 * k);
            hang |= (uint64_t)(unsigned)FGW_IN(b, 0xEA, 4) << (16 * k);
            b3 |= (uint64_t)(unsigned)FGW_IN(b, 0xE0, 16) << (16 * k);
            o4 |= (uint64_t)(unsigned)FGW_IN(b, 0xF0, 5) << (16 * k);
        }
        #undef FGW_IN
        h->c2 = c2; h->u2l = u2l; h->u2x = u2x; h->cjk = cjk; h->hang = hang; h->o3 = b3 & ~(cjk | hang);
        h->o4 = o4;
    #else
        int j;
        memset(h, 0, sizeof(*h));
        for (j = 0; j < 16 * lanes; j++) {
            uint64_t bit = 1ULL << j;
            switch (fgw_cls[p[j]]) {
            case K_C2: h->c2 |= bit; break;
            case K_U2L: h->u2l |= bit; break;
            case K_U2X: h->u2x |= bit; break;
            case K_CJK: h->cjk |= bit; break;
            case K_HANG: h->hang |= bit; break;
            case K_O3: h->o3 |= bit; break;
            case K_O4: h->o4 |= bit; break;
            default: break;
            }
        }
    #endif
    }

    /* Price the m (1..64) classified positions of a block and carry the masks in e (a local copy of the
       state, so that a run of blocks keeps it in registers). Only the last block of a text may be short: it
       classifies only the 16-byte lanes it needs (most strings of a chat body, roles and names, are a few
       bytes). */
    static inline __attribute__((always_inline)) void fgw_block_impl(
            fgw_state *e, int m,
            uint64_t LET, uint64_t LOW, uint64_t D, uint64_t S, uint64_t N, uint64_t H, const fgw_hi *hm) {
        const fgw_prices *P = e->P;
        const uint64_t V = m >= 64 ? ~0ULL : ((1ULL << m) - 1);
        uint64_t PU, U2 = 0, W, W1, UP, A2, A4, R, LOWX, E = 0, WS, PRE = 0, NLR = 0, P1;
        long long t = 0;
        LET &= V; LOW &= V; D &= V; S &= V; N &= V; H &= V;
        PU = V & ~(LET | D | S | N | H);                 /* ASCII symbols and control characters */
        if (H) {                                          /* lead bytes of multi-byte characters */
            PU |= hm->c2 & H;
            U2 = (hm->u2l | hm->u2x) & H;
            /* CJK, Hangul, other 3-byte and 4-byte characters are priced alone: they end the run before
               them (they are in no mask) */
            t += P->u2l * FGW_PC(hm->u2l & H) + P->u2x * FGW_PC(hm->u2x & H) + P->cjk * FGW_PC(hm->cjk & H)
                 + P->hangul * FGW_PC(hm->hang & H) + P->other3 * FGW_PC(hm->o3 & H)
                 + P->char4 * FGW_PC(hm->o4 & H);
        }
        /* words: 1 token at the first letter, then the increments of the length table */
        W = LET | U2;
        UP = LET & ~LOW;
        W1 = FGW_SH(W, e->hW, 1);
        t += 100 * FGW_PC(W & ~W1);
        A2 = W & W1;                                      /* letters with >= 1 letter before them */
        A4 = A2 & FGW_SH(A2, e->hA2, 2);                  /* >= 3 */
        R = A4 & FGW_SH(A4, e->hA4, 3);                   /* >= 6: the 7th letter of a word and later */
        /* step k: R = the letters with >= k-1 before them (the k-th of a word and later) add D[k] */
        #define FGW_WSTEP(k) t += FGW_D[k] * FGW_PC(R); R &= FGW_SH(W, e->hW, k); if (!R) goto words_done;
        if (R) {
            FGW_WSTEP(7) FGW_WSTEP(8) FGW_WSTEP(9) FGW_WSTEP(10) FGW_WSTEP(11) FGW_WSTEP(12) FGW_WSTEP(13)
            FGW_WSTEP(14) FGW_WSTEP(15) FGW_WSTEP(16) FGW_WSTEP(17)
            t += FGW_D[18] * FGW_PC(R);                   /* beyond the 18th, every letter adds the same */
        }
        #undef FGW_WSTEP
    words_done:
        /* camelCase: an uppercase letter right after a lowercase one; accented letters keep the flag */
        LOWX = LOW;
        if (U2) {
            for (;;) {
                uint64_t n = LOWX | (U2 & FGW_SH(LOWX, e->hLOWX, 1));
                if (n == LOWX) break;
                LOWX = n;
            }
        }
        t += P->camel * FGW_PC(UP & FGW_SH(LOWX, e->hLOWX, 1));
        /* digits: one token per group of three from the run's start: the 1st, 4th, 7th... digit */
        if (D | e->hD) {
            uint64_t D1 = FGW_SH(D, e->hD, 1), D3 = D & D1 & FGW_SH(D, e->hD, 2);
            E = D & ~D1;
            for (;;) {
                uint64_t n = E | (FGW_SH(E, e->hE, 3) & D3);
                if (n == E) break;
                E = n;
            }
            t += 100 * FGW_PC(E);
        }
        /* whitespace runs: with a newline `newlines`, else 2+ long `spaces`, else (one space) free.
           PRE = a run's leading spaces before its first newline (an add carries through them), NLR = the
           rest of the run. Then: +newlines at the first newline, +spaces at the 2nd leading space, and
           -spaces at a first newline after 2+ leading spaces. */
        WS = S | N;
        if (!N && !(WS & FGW_SH(WS, e->hWS, 1))) {
            PRE = S;   /* the usual block of prose: single spaces, none touching another: free, NLR = 0 */
        } else {
            uint64_t seed = (WS & ~FGW_SH(WS, e->hWS, 1) & S) | (S & (e->hPRE >> 63));
            uint64_t FN, Q1, Q2;
            PRE = S & ~(S + seed);
            NLR = WS & ~PRE;
            FN = NLR & ~FGW_SH(NLR, e->hNLR, 1);
            Q1 = FGW_SH(PRE, e->hPRE, 1);
            Q2 = FGW_SH(PRE, e->hPRE, 2);
            t += P->newlines * FGW_PC(FN) + P->spaces * (FGW_PC(PRE & Q1 & ~Q2) - FGW_PC(FN & Q1 & Q2));
        }
        /* symbol runs: `punc` for the first, `punc_more` for each further one */
        P1 = FGW_SH(PU, e->hP, 1);
        t += P->punc * FGW_PC(PU & ~P1) + P->punc_more * FGW_PC(PU & P1);
        e->total += t;
        e->hW = W; e->hA2 = A2; e->hA4 = A4; e->hLOWX = LOWX; e->hD = D; e->hE = E; e->hWS = WS;
        e->hPRE = PRE; e->hNLR = NLR; e->hP = PU;
    }

    /* fgw_run_X: whole blocks, n of them at p, in one call (the constants and the state stay in registers);
       fgw_tail_X: the last, short one (only the 16- or 32-byte lanes it needs). With ascii_only, the run
       stops before a block holding a byte >= 0x80 (the caller then copies it through buf, dropping
       continuation bytes; classifying first makes that check free) and a tail with one is left alone.
       Both return how many blocks they priced. */
    #define FGW_BLOCK_FUNCS(SUFFIX, ATTR, CLASSIFY, LANE)                                                \\
        ATTR static size_t fgw_run_##SUFFIX(fgw_est *e, const unsigned char *p, size_t n, int ascii_only) { \\
            fgw_state st = e->s;                                                                          \\
            size_t i;                                                                                     \\
            for (i = 0; i < n; i++, p += 64) {                                                            \\
                uint64_t L, Lo, D, S, N, H;                                                               \\
                fgw_hi hm = {0, 0, 0, 0, 0, 0, 0};                                                       \\
                CLASSIFY(p, 64 / LANE, &L, &Lo, &D, &S, &N, &H);                                          \\
                if (H) {                                                                                  \\
                    if (ascii_only)                                                                       \\
                        break;                                                                            \\
                    fgw_classify_hi(p, 4, &hm);                                                           \\
                }                                                                                         \\
                fgw_block_impl(&st, 64, L, Lo, D, S, N, H, &hm);                                          \\
            }                                                                                             \\
            e->s = st;                                                                                    \\
            return i;                                                                                     \\
        }                                                                                                 \\
        ATTR static int fgw_tail_##SUFFIX(fgw_est *e, const unsigned char *p, int m, int ascii_only) {    \\
            uint64_t L, Lo, D, S, N, H;                                                                   \\
            fgw_hi hm = {0, 0, 0, 0, 0, 0, 0};                                                           \\
            CLASSIFY(p, (m + LANE - 1) / LANE, &L, &Lo, &D, &S, &N, &H);                                  \\
            if (H & ((1ULL << m) - 1)) {                                                                  \\
                if (ascii_only)                                                                           \\
                    return 0;                                                                             \\
                fgw_classify_hi(p, (m + 15) / 16, &hm);                                                   \\
            }                                                                                             \\
            fgw_block_impl(&e->s, m, L, Lo, D, S, N, H, &hm);                                             \\
            return 1;                                                                                     \\
        }

    FGW_BLOCK_FUNCS(generic, , fgw_classify, 16)
    #if defined(__GNUC__) && defined(__x86_64__)
    /* The same with POPCNT and ANDN (setup.py builds for baseline x86-64, which lacks them), and with AVX2
       (32-byte compares: half the classification work), chosen at import by what the CPU has. */
    #include <immintrin.h>
    __attribute__((target("avx2"))) static inline __attribute__((always_inline)) void fgw_classify_avx2(
            const unsigned char *p, int lanes, uint64_t *let, uint64_t *low, uint64_t *dig, uint64_t *sp,
            uint64_t *nl, uint64_t *hi) {
        uint64_t L = 0, Lo = 0, D = 0, S = 0, N = 0, H = 0;
        const __m256i x20 = _mm256_set1_epi8(0x20);
        const __m256i offa = _mm256_set1_epi8((char)(0x80 - 'a')), lim26 = _mm256_set1_epi8((char)(0x80 + 26));
        const __m256i off0 = _mm256_set1_epi8((char)(0x80 - '0')), lim10 = _mm256_set1_epi8((char)(0x80 + 10));
        const __m256i c32 = _mm256_set1_epi8(32), c9 = _mm256_set1_epi8(9), c10 = _mm256_set1_epi8(10),
                      c13 = _mm256_set1_epi8(13);
        int k;
        for (k = 0; k < lanes; k++) {
            __m256i b = _mm256_loadu_si256((const __m256i *)(p + 32 * k));
            __m256i isl = _mm256_cmpgt_epi8(lim26, _mm256_add_epi8(_mm256_or_si256(b, x20), offa));
            __m256i islo = _mm256_cmpgt_epi8(lim26, _mm256_add_epi8(b, offa));
            __m256i isd = _mm256_cmpgt_epi8(lim10, _mm256_add_epi8(b, off0));
            __m256i iss = _mm256_or_si256(_mm256_cmpeq_epi8(b, c32), _mm256_cmpeq_epi8(b, c9));
            __m256i isn = _mm256_or_si256(_mm256_cmpeq_epi8(b, c10), _mm256_cmpeq_epi8(b, c13));
            L |= (uint64_t)(uint32_t)_mm256_movemask_epi8(isl) << (32 * k);
            Lo |= (uint64_t)(uint32_t)_mm256_movemask_epi8(islo) << (32 * k);
            D |= (uint64_t)(uint32_t)_mm256_movemask_epi8(isd) << (32 * k);
            S |= (uint64_t)(uint32_t)_mm256_movemask_epi8(iss) << (32 * k);
            N |= (uint64_t)(uint32_t)_mm256_movemask_epi8(isn) << (32 * k);
            H |= (uint64_t)(uint32_t)_mm256_movemask_epi8(b) << (32 * k);
        }
        *let = L; *low = Lo; *dig = D; *sp = S; *nl = N; *hi = H;
    }
    /* AVX-512BW: a block is one register and each class one compare into a mask register, a third of the
       AVX2 classification's instructions. Chosen only on CPUs that also have AVX512-VBMI (Ice Lake and
       later, Zen 4), where 512-bit integer work does not lower the core's clock as on Skylake-SP. Every
       caller can read 64 bytes at p (a short last block lies in buf, or in place with 64 readable). */
    __attribute__((target("avx512f,avx512bw"))) static inline __attribute__((always_inline)) void fgw_classify_avx512(
            const unsigned char *p, int lanes, uint64_t *let, uint64_t *low, uint64_t *dig, uint64_t *sp,
            uint64_t *nl, uint64_t *hi) {
        const __m512i b = _mm512_loadu_si512((const void *)p);
        const __m512i a = _mm512_set1_epi8('a'), n26 = _mm512_set1_epi8(26);
        (void)lanes;
        *let = _mm512_cmplt_epu8_mask(_mm512_sub_epi8(_mm512_or_si512(b, _mm512_set1_epi8(0x20)), a), n26);
        *low = _mm512_cmplt_epu8_mask(_mm512_sub_epi8(b, a), n26);
        *dig = _mm512_cmplt_epu8_mask(_mm512_sub_epi8(b, _mm512_set1_epi8('0')), _mm512_set1_epi8(10));
        *sp = _mm512_cmpeq_epi8_mask(b, _mm512_set1_epi8(32)) | _mm512_cmpeq_epi8_mask(b, _mm512_set1_epi8(9));
        *nl = _mm512_cmpeq_epi8_mask(b, _mm512_set1_epi8(10)) | _mm512_cmpeq_epi8_mask(b, _mm512_set1_epi8(13));
        *hi = _mm512_movepi8_mask(b);
    }
    FGW_BLOCK_FUNCS(popcnt, __attribute__((target("popcnt,bmi"))), fgw_classify, 16)
    FGW_BLOCK_FUNCS(avx2, __attribute__((target("avx2,popcnt,bmi"))), fgw_classify_avx2, 32)
    FGW_BLOCK_FUNCS(avx512, __attribute__((target("avx512f,avx512bw,avx2,popcnt,bmi"))), fgw_classify_avx512, 64)
    #endif
    /* fgw_copy_stop_X: copy p[0:n] to out up to the first '"' or '\\\\' and return its offset (n when there
       is none): a string with escapes is decoded in one pass over its plain text, not found then copied.
       Whole lanes are stored, so out[offset:n] may be overwritten too (never past out[n]). */
    static size_t fgw_copy_stop_generic(unsigned char *out, const unsigned char *p, size_t n) {
        size_t i = 0;
    #if defined(__SSE2__)
        const __m128i q = _mm_set1_epi8('"'), bs = _mm_set1_epi8('\\\\');
        for (; i + 16 <= n; i += 16) {
            __m128i b = _mm_loadu_si128((const __m128i *)(p + i));
            unsigned m = (unsigned)_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(b, q), _mm_cmpeq_epi8(b, bs)));
            _mm_storeu_si128((__m128i *)(out + i), b);
            if (m)
                return i + (size_t)__builtin_ctz(m);
        }
    #endif
        for (; i < n; i++) {
            if (p[i] == '"' || p[i] == '\\\\')
                return i;
            out[i] = p[i];
        }
        return n;
    }
    #if defined(__GNUC__) && defined(__x86_64__)
    __attribute__((target("avx2,bmi"))) static size_t fgw_copy_stop_avx2(unsigned char *out, const unsigned char *p,
                                                                         size_t n) {
        size_t i = 0;
        const __m256i q = _mm256_set1_epi8('"'), bs = _mm256_set1_epi8('\\\\');
        for (; i + 64 <= n; i += 64) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(p + i)), b = _mm256_loadu_si256((const __m256i *)(p + i + 32));
            uint64_t m = (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_or_si256(_mm256_cmpeq_epi8(a, q),
                                                                                   _mm256_cmpeq_epi8(a, bs)))
                         | (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_or_si256(_mm256_cmpeq_epi8(b, q),
                                                                                     _mm256_cmpeq_epi8(b, bs))) << 32;
            _mm256_storeu_si256((__m256i *)(out + i), a);
            _mm256_storeu_si256((__m256i *)(out + i + 32), b);
            if (m)
                return i + (size_t)__builtin_ctzll(m);
        }
        return i + fgw_copy_stop_generic(out + i, p + i, n - i);
    }
    #endif
    static size_t (*fgw_copy_stop)(unsigned char *, const unsigned char *, size_t) = fgw_copy_stop_generic;
    static size_t (*fgw_run)(fgw_est *, const unsigned char *, size_t, int) = fgw_run_generic;
    static int (*fgw_tail)(fgw_est *, const unsigned char *, int, int) = fgw_tail_generic;

    /* Use variant v (0 generic, 1 popcnt, 2 avx2, 3 avx512) if the CPU has it; returns whether it does. */
    static int fgw_use_variant(int v) {
    #if defined(__GNUC__) && defined(__x86_64__)
        __builtin_cpu_init();
        if (v == 3 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi")
                && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")
                && __builtin_cpu_supports("bmi")) {
            fgw_run = fgw_run_avx512;
            fgw_tail = fgw_tail_avx512;
            fgw_copy_stop = fgw_copy_stop_avx2;
            return 1;
        }
        if (v == 2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")
                && __builtin_cpu_supports("bmi")) {
            fgw_run = fgw_run_avx2;
            fgw_tail = fgw_tail_avx2;
            fgw_copy_stop = fgw_copy_stop_avx2;
            return 1;
        }
        if (v == 1 && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi")) {
            fgw_run = fgw_run_popcnt;
            fgw_tail = fgw_tail_popcnt;
            fgw_copy_stop = fgw_copy_stop_generic;
            return 1;
        }
    #endif
        if (v == 0) {
            fgw_run = fgw_run_generic;
            fgw_tail = fgw_tail_generic;
            fgw_copy_stop = fgw_copy_stop_generic;
            return 1;
        }
        return 0;
    }

    static void fgw_init_cpu(void) {
        if (!fgw_use_variant(3) && !fgw_use_variant(2) && !fgw_use_variant(1))
            fgw_use_variant(0);
    }

    static inline void fgw_est_init(fgw_est *e, const fgw_prices *P) {
        memset(e, 0, offsetof(fgw_est, buf));
        e->s.P = P;
    }

    static inline int fgw_ascii(const unsigned char *p, size_t n) {
        uint64_t acc = 0, w;
        size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            memcpy(&w, p + i, 8);
            acc |= w;
        }
        for (; i < n; i++)
            acc |= p[i];
        return (acc & 0x8080808080808080ULL) == 0;
    }

    /* Feed n bytes of text. Whole ASCII blocks are priced in place; the rest goes through buf, dropping
       continuation and invalid bytes. */
    static void fgw_est_feed(fgw_est *e, const unsigned char *p, size_t n) {
        while (n) {
            size_t take, j;
            if (e->fill == 0 && n >= 64) {
                size_t k = fgw_run(e, p, n / 64, 1);
                p += 64 * k;
                n -= 64 * k;
                if (!n)
                    return;
            }
            take = 64 - (size_t)e->fill;
            if (take > n)
                take = n;
            if (fgw_ascii(p, take)) {
                memcpy(e->buf + e->fill, p, take);
                e->fill += (int)take;
            } else {
                int fill = e->fill;   /* a local: stores to buf (chars) could alias e->fill */
                unsigned char *buf = e->buf;
                for (j = 0; j < take; j++) {
                    buf[fill] = p[j];
                    fill += fgw_keep[p[j]];
                }
                e->fill = fill;
            }
            p += take;
            n -= take;
            if (e->fill == 64) {
                fgw_run(e, e->buf, 1, 0);
                e->fill = 0;
            }
        }
    }

    static inline long long fgw_est_total(const fgw_est *e) {
        return (e->s.total + 50) / 100;
    }

    static inline long long fgw_est_finish(fgw_est *e) {
        if (e->fill) {
            fgw_tail(e, e->buf, e->fill, 0);
            e->fill = 0;
        }
        return fgw_est_total(e);
    }

    /* Feed the last n bytes of a text and return the estimate; p[0:avail] is readable, avail >= n. The
       short last block is classified in place when 64 bytes can be read there (a chat body's roles and
       the ends of its strings), not copied. */
    static inline long long fgw_est_feed_last(fgw_est *e, const unsigned char *p, size_t n, size_t avail) {
        if (e->fill == 0) {
            if (n >= 64) {
                size_t k = fgw_run(e, p, n / 64, 1);
                p += 64 * k;
                n -= 64 * k;
                avail -= 64 * k;
            }
            if (n == 0)
                return fgw_est_total(e);
            if (n < 64 && avail >= 64 && fgw_tail(e, p, (int)n, 1))
                return fgw_est_total(e);
        }
        fgw_est_feed(e, p, n);
        return fgw_est_finish(e);
    }

    /* The first '"' or '\\\\' of p[0:n], or n */
    static inline size_t fgw_find_stop(const unsigned char *p, size_t n) {
        size_t i = 0;
    #if defined(__SSE2__)
        const __m128i q = _mm_set1_epi8('"'), bs = _mm_set1_epi8('\\\\');
        /* 64 bytes per test while nothing is found (long content strings), then 16 to place it */
        for (; i + 64 <= n; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(p + i)), b = _mm_loadu_si128((const __m128i *)(p + i + 16)),
                    c = _mm_loadu_si128((const __m128i *)(p + i + 32)), d = _mm_loadu_si128((const __m128i *)(p + i + 48));
            __m128i hit = _mm_or_si128(_mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(a, q), _mm_cmpeq_epi8(a, bs)),
                                                    _mm_or_si128(_mm_cmpeq_epi8(b, q), _mm_cmpeq_epi8(b, bs))),
                                       _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(c, q), _mm_cmpeq_epi8(c, bs)),
                                                    _mm_or_si128(_mm_cmpeq_epi8(d, q), _mm_cmpeq_epi8(d, bs))));
            if (_mm_movemask_epi8(hit))
                break;
        }
        for (; i + 16 <= n; i += 16) {
            __m128i b = _mm_loadu_si128((const __m128i *)(p + i));
            unsigned m = (unsigned)_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(b, q), _mm_cmpeq_epi8(b, bs)));
            if (m)
                return i + (size_t)__builtin_ctz(m);
        }
    #endif
        for (; i < n; i++)
            if (p[i] == '"' || p[i] == '\\\\')
                return i;
        return n;
    }
    """
    ctypedef struct fgw_prices:
        int camel, u2l, u2x, punc, punc_more, spaces, newlines, cjk, hangul, other3, char4
    ctypedef struct fgw_est:
        int fill
    void fgw_init()
    void fgw_init_cpu()
    int fgw_use_variant(int v)
    void fgw_est_init(fgw_est* e, const fgw_prices* P) nogil
    void fgw_est_feed(fgw_est* e, const uchar* p, size_t n) nogil
    long long fgw_est_finish(fgw_est* e) nogil
    long long fgw_est_feed_last(fgw_est* e, const uchar* p, size_t n, size_t avail) nogil
    size_t fgw_find_stop(const uchar* p, size_t n) nogil
    size_t fgw_copy_stop(uchar* out, const uchar* p, size_t n) nogil
    const int* FGW_WORD


fgw_init()
fgw_init_cpu()

_VARIANTS = ("generic", "popcnt", "avx2", "avx512")


def _use_variant(str name):
    """For tests: price blocks with code variant `name` ("generic", "popcnt", "avx2" or "avx512"; the best the CPU has
    is chosen at import); returns False (and changes nothing) when this CPU lacks it."""
    return bool(fgw_use_variant(_VARIANTS.index(name)))


def _best_variant():
    """For tests: go back to the variant chosen at import."""
    fgw_init_cpu()

# ------------------------------------------------------------------------------------------- prices

# Fitted (coordinate descent on mean |relative error|) against tiktoken on tests/data/tokens.
cdef fgw_prices CL100K = fgw_prices(camel=10, u2l=120, u2x=35, punc=90, punc_more=15, spaces=100, newlines=60,
                                    cjk=110, hangul=125, other3=140, char4=200)
cdef fgw_prices O200K = fgw_prices(camel=55, u2l=0, u2x=5, punc=85, punc_more=25, spaces=100, newlines=70,
                                   cjk=70, hangul=65, other3=115, char4=200)


cdef const fgw_prices* _prices(str encoding) except NULL:
    if encoding is None or encoding == "o200k_base":
        return &O200K
    if encoding == "cl100k_base":
        return &CL100K
    raise ValueError(f"no token estimate for encoding {encoding!r}; known: cl100k_base, o200k_base")


def estimate_text_tokens(b, str encoding="o200k_base"):
    """Estimated token count of UTF-8 text `b` (bytes; a str is encoded) for `encoding`
    ("o200k_base", the default, or "cl100k_base")."""
    cdef fgw_est e
    if isinstance(b, str):
        b = (<str>b).encode("utf-8", "surrogatepass")
    cdef bytes data = b
    fgw_est_init(&e, _prices(encoding))
    # No nogil: the work takes about a microsecond, less than releasing and taking back the GIL is worth.
    fgw_est_feed(&e, <const uchar*>PyBytes_AS_STRING(data), <size_t>PyBytes_GET_SIZE(data))
    return fgw_est_finish(&e)

# -------------------------------------------------------------------------------------- chat bodies

cdef enum:
    PER_MESSAGE = 3      # <|start|>{role}<|message|>... (the role itself is counted as text)
    PER_NAME = 1
    REPLY_PRIMING = 3    # every reply is primed with <|start|>assistant<|message|>

TOKENS_PER_MESSAGE = PER_MESSAGE
TOKENS_PER_NAME = PER_NAME
TOKENS_REPLY_PRIMING = REPLY_PRIMING

cdef enum:
    V_OTHER = 0    # strings not counted, objects/arrays walked
    V_TEXT         # strings counted
    V_TOKENS       # strings counted, and non-negative integers count 1 (prompt/input given as token ids)
    MAX_DEPTH = 64

cdef struct Walk:
    const uchar* d
    Py_ssize_t n
    const fgw_prices* P
    long long total
    Py_ssize_t messages


cdef inline int hexval(uchar c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    c |= 0x20
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef int hex4(const uchar* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    cdef int v = 0, h, j
    if i + 4 > n:
        return -1
    for j in range(4):
        h = hexval(d[i + j])
        if h < 0:
            return -1
        v = v * 16 + h
    return v


cdef enum:
    DECODED_MAX = 4096   # a string with escapes is decoded into a stack buffer of this size, then priced


cdef Py_ssize_t price_string(Walk* w, Py_ssize_t i) noexcept nogil:
    """Price the JSON string at d[i] (opening quote) as its decoded text; position after it, or -1.

    Without escapes the text is priced where it lies. With escapes (a prompt's every newline is one) it is
    decoded into a buffer, its plain text copied while the next stop is looked for (fgw_copy_stop), and priced
    from there in pieces of up to DECODED_MAX bytes: feeding the pieces between escapes one by one would send a
    block through the estimator's copy path after each escape."""
    cdef const uchar* d = w.d
    cdef Py_ssize_t n = w.n, k = 0, lim, c
    cdef fgw_est e
    cdef uchar out[DECODED_MAX]
    cdef uchar ch
    cdef int cp, lo
    cdef Py_ssize_t j = i + 1
    # A single lowercase word ("user", "assistant", ...: every role) is priced by the length table alone.
    while j < n and 97 <= d[j] <= 122 and j - i <= 17:
        j += 1
    if j < n and d[j] == 34 and j - i <= 17:
        w.total += (FGW_WORD[j - i - 1] + 50) // 100
        return j + 1
    fgw_est_init(&e, w.P)
    i += 1
    j = i + <Py_ssize_t>fgw_find_stop(d + i, <size_t>(n - i))
    if j >= n:
        return -1
    if d[j] == 34:
        w.total += fgw_est_feed_last(&e, d + i, <size_t>(j - i), <size_t>(n - i))
        return j + 1
    # From the string's start again: the text before the first escape is copied on this pass.
    while True:
        # the plain text up to the next stop, into the buffer (flushed whenever it fills)
        while True:
            lim = min(n - i, DECODED_MAX - k)
            c = <Py_ssize_t>fgw_copy_stop(out + k, d + i, <size_t>lim)
            k += c
            i += c
            if c < lim:
                break             # d[i] is a stop
            if i >= n:
                return -1         # no closing quote
            fgw_est_feed(&e, out, k)
            k = 0
        if d[i] == 34:
            fgw_est_feed(&e, out, k)
            w.total += fgw_est_finish(&e)
            return i + 1
        # a backslash escape: at most 4 bytes of UTF-8
        if k > DECODED_MAX - 4:
            fgw_est_feed(&e, out, k)
            k = 0
        if i + 1 >= n:
            return -1
        ch = d[i + 1]
        i += 2
        if ch == 117:  # \uXXXX, surrogate pairs joined, lone surrogates as UTF-8-style bytes (surrogatepass)
            cp = hex4(d, i, n)
            if cp < 0:
                return -1
            i += 4
            if 0xD800 <= cp < 0xDC00 and i + 6 <= n and d[i] == 92 and d[i + 1] == 117:
                lo = hex4(d, i + 2, n)
                if 0xDC00 <= lo < 0xE000:
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                    i += 6
            k += put_utf8(out + k, cp)
        else:
            if ch == 110:
                out[k] = 10
            elif ch == 116:
                out[k] = 9
            elif ch == 114:
                out[k] = 13
            elif ch == 98:
                out[k] = 8
            elif ch == 102:
                out[k] = 12
            elif ch == 34 or ch == 92 or ch == 47:
                out[k] = ch
            else:
                return -1
            k += 1


cdef inline bint key_is(const uchar* d, Py_ssize_t ks, Py_ssize_t kl, const char* name, Py_ssize_t nl) noexcept nogil:
    cdef Py_ssize_t j
    if kl != nl:
        return False
    for j in range(kl):
        if d[ks + j] != <uchar>name[j]:
            return False
    return True


cdef int text_key(const uchar* d, Py_ssize_t ks, Py_ssize_t kl) noexcept nogil:
    """Kind of the value of a nested member: the keys whose strings are prompt text."""
    if (key_is(d, ks, kl, b"content", 7) or key_is(d, ks, kl, b"text", 4) or key_is(d, ks, kl, b"role", 4)
            or key_is(d, ks, kl, b"name", 4) or key_is(d, ks, kl, b"arguments", 9)
            or key_is(d, ks, kl, b"refusal", 7) or key_is(d, ks, kl, b"output", 6)):
        return V_TEXT
    return V_OTHER


cdef Py_ssize_t walk_object(Walk* w, Py_ssize_t i, bint is_msg, int depth) noexcept nogil:
    cdef const uchar* d = w.d
    cdef Py_ssize_t n = w.n, ks, kl
    cdef int kind
    cdef bint arr
    if is_msg:
        w.total += PER_MESSAGE
        w.messages += 1
    i = skip_ws(d, i + 1, n)
    if i < n and d[i] == 125:
        return i + 1
    while True:
        if i >= n or d[i] != 34:
            return -1
        ks = i + 1
        i = skip_string(d, i, n)
        if i < 0:
            return -1
        kl = i - 1 - ks
        i = skip_ws(d, i, n)
        if i >= n or d[i] != 58:
            return -1
        i = skip_ws(d, i + 1, n)
        arr = False
        if depth == 1:  # the request's top level: only the prompt-bearing members are walked
            if key_is(d, ks, kl, b"messages", 8):
                kind = V_TEXT
                arr = True
            elif key_is(d, ks, kl, b"input", 5):
                kind = V_TOKENS
                arr = True
            elif key_is(d, ks, kl, b"prompt", 6):
                kind = V_TOKENS
            elif key_is(d, ks, kl, b"instructions", 12) or key_is(d, ks, kl, b"system", 6):
                kind = V_TEXT
            else:
                kind = -1
        else:
            kind = text_key(d, ks, kl)
            if is_msg and key_is(d, ks, kl, b"name", 4):
                w.total += PER_NAME
        if kind < 0:
            i = skip_value(d, i, n)
        else:
            i = walk_value(w, i, kind, arr, False, depth)
        if i < 0:
            return -1
        i = skip_ws(d, i, n)
        if i < n and d[i] == 44:
            i = skip_ws(d, i + 1, n)
            continue
        if i < n and d[i] == 125:
            return i + 1
        return -1


cdef Py_ssize_t walk_value(Walk* w, Py_ssize_t i, int kind, bint msg_array, bint is_msg, int depth) noexcept nogil:
    cdef const uchar* d = w.d
    cdef Py_ssize_t n = w.n, j
    cdef uchar c
    if i >= n:
        return -1
    c = d[i]
    if c == 34:
        if kind == V_OTHER:
            return skip_string(d, i, n)
        return price_string(w, i)
    if depth >= MAX_DEPTH and (c == 123 or c == 91):
        return skip_value(d, i, n)  # pathological nesting is not walked (and not counted)
    if c == 123:
        return walk_object(w, i, is_msg, depth + 1)
    if c == 91:
        i = skip_ws(d, i + 1, n)
        if i < n and d[i] == 93:
            return i + 1
        while True:
            i = walk_value(w, i, kind, False, msg_array, depth + 1)
            if i < 0:
                return -1
            i = skip_ws(d, i, n)
            if i < n and d[i] == 44:
                i = skip_ws(d, i + 1, n)
                continue
            if i < n and d[i] == 93:
                return i + 1
            return -1
    j = skip_scalar(d, i, n)
    if j < 0:
        return -1
    if kind == V_TOKENS and 48 <= c <= 57:  # a token id: count it if it is a plain non-negative integer
        while i < j and 48 <= d[i] <= 57:
            i += 1
        if i == j:
            w.total += 1
    return j


def estimate_chat_tokens(body, str encoding="o200k_base"):
    """Estimated prompt tokens of a raw JSON request body (chat/completions, completions, embeddings,
    responses), for `encoding` ("o200k_base", the default, or "cl100k_base").

    Counted: the strings of top-level `messages`, `prompt`, `input`, `instructions`, `system`, and below them
    the strings under keys content/text/role/name/arguments/refusal/output (so the text parts of content
    arrays, tool-call arguments and Responses function_call_output items; not image URLs or `type`);
    integers in `prompt`/`input` arrays count one token each (token-id prompts); each message object (element
    of `messages` or of an `input` array) adds 3, its `name` 1, and 3 more for the reply when there is any
    message. Each string is priced by estimate_text_tokens on its decoded UTF-8; duplicate keys are all
    counted (json.loads would keep the last). Everything else (model, temperature, tools...) is
    skipped without parsing. Returns -1 when the body is not well-formed JSON (as far as the scan can tell).
    """
    cdef Walk w
    cdef bytes data = body if isinstance(body, bytes) else bytes(body)
    cdef Py_ssize_t i
    w.d = <const uchar*>PyBytes_AS_STRING(data)
    w.n = PyBytes_GET_SIZE(data)
    w.P = _prices(encoding)
    w.total = 0
    w.messages = 0
    i = skip_ws(w.d, 0, w.n)
    if i < w.n and w.d[i] == 123:
        i = walk_object(&w, i, False, 1)
    else:
        i = skip_value(w.d, i, w.n)
    if i >= 0:
        i = skip_ws(w.d, i, w.n)
    if i != w.n:
        return -1
    if w.messages:
        w.total += REPLY_PRIMING
    return w.total

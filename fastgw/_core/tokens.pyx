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

estimate_chat_tokens() walks the raw JSON of a request once, without building Python objects, and prices the
content strings with the same estimator (JSON escapes decoded on the fly), plus OpenAI's framing overhead.
"""
from libc.string cimport memchr
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

ctypedef unsigned char uchar

# ------------------------------------------------------------------------------------- byte classes

cdef enum:
    K_LOWER = 0
    K_UPPER
    K_DIGIT
    K_SPACE
    K_NL
    K_PUNCT
    K_STOP      # '"' and '\\': punctuation in plain text, string end / escape inside JSON
    K_C2        # 2-byte lead U+0080-U+00BF: Latin-1 symbols (° × ¿ « ...): punctuation
    K_U2L       # 2-byte lead U+00C0-U+027F: accented Latin letters
    K_U2X       # 2-byte lead U+0280-U+07FF: IPA, Greek, Cyrillic, Armenian, Hebrew, Arabic...
    K_CJK       # 3-byte lead U+3000-U+9FFF: CJK punctuation, kana, ideographs
    K_HANG      # 3-byte lead U+A000-U+DFFF: Hangul (and rarer scripts)
    K_O3        # other 3-byte: Indic, Thai, general punctuation (— “ …), math, fullwidth forms
    K_O4        # 4-byte: emoji, rare ideographs
    K_CONT      # continuation byte
    K_BAD       # never valid in UTF-8

cdef enum:
    R_NONE = 0
    R_WORD
    R_DIGIT
    R_WS
    R_PUNCT

cdef uchar CLS[256]


cdef void _init_classes() noexcept:
    cdef int c
    for c in range(256):
        if 97 <= c <= 122:
            CLS[c] = K_LOWER
        elif 65 <= c <= 90:
            CLS[c] = K_UPPER
        elif 48 <= c <= 57:
            CLS[c] = K_DIGIT
        elif c == 32 or c == 9:
            CLS[c] = K_SPACE
        elif c == 10 or c == 13:
            CLS[c] = K_NL
        elif c == 34 or c == 92:
            CLS[c] = K_STOP
        elif c < 128:
            CLS[c] = K_PUNCT
        elif c < 0xC0:
            CLS[c] = K_CONT
        elif c == 0xC2:
            CLS[c] = K_C2
        elif 0xC3 <= c <= 0xC9:
            CLS[c] = K_U2L
        elif 0xCA <= c <= 0xDF:
            CLS[c] = K_U2X
        elif 0xE3 <= c <= 0xE9:
            CLS[c] = K_CJK
        elif 0xEA <= c <= 0xED:
            CLS[c] = K_HANG
        elif 0xE0 <= c <= 0xEF:
            CLS[c] = K_O3
        elif 0xF0 <= c <= 0xF4:
            CLS[c] = K_O4
        else:
            CLS[c] = K_BAD


_init_classes()

# ------------------------------------------------------------------------------------------- prices

cdef struct Prices:        # hundredths of a token
    int camel              # per lower->UPPER change inside a word
    int u2l                # per accented Latin letter in a word
    int u2x                # per Greek/Cyrillic/... letter in a word
    int punc               # first symbol of a run
    int punc_more          # each further symbol of the run
    int spaces             # a run of 2+ spaces/tabs
    int newlines           # a whitespace run containing a newline
    int cjk
    int hangul
    int other3
    int char4

# Fitted (coordinate descent on mean |relative error|) against tiktoken on tests/data/tokens.
cdef Prices CL100K = Prices(camel=10, u2l=120, u2x=35, punc=90, punc_more=15, spaces=100, newlines=60,
                            cjk=110, hangul=125, other3=140, char4=200)
cdef Prices O200K = Prices(camel=55, u2l=0, u2x=5, punc=85, punc_more=25, spaces=100, newlines=70,
                           cjk=70, hangul=65, other3=115, char4=200)

# Mean tokens of " word" by word length (letters), measured on the Python language reference
# (pydoc_data.topics) with both encodings (they agree within 0.02 up to 16 letters); beyond: 0.2 per letter.
cdef int WORD[17]
WORD[:] = [0, 100, 100, 100, 100, 100, 100, 105, 110, 110, 110, 125, 145, 150, 160, 220, 260]


cdef const Prices* _prices(str encoding) except NULL:
    if encoding is None or encoding == "o200k_base":
        return &O200K
    if encoding == "cl100k_base":
        return &CL100K
    raise ValueError(f"no token estimate for encoding {encoding!r}; known: cl100k_base, o200k_base")

# ---------------------------------------------------------------------------------------- estimator

cdef struct Est:
    const Prices* P
    long long total        # hundredths of a token, closed runs
    int run
    int length             # characters in the open run
    int u2l, u2x, camel, newlines
    bint prev_lower


cdef inline void est_init(Est* e, const Prices* P) noexcept nogil:
    e.P = P
    e.total = 0
    e.run = R_NONE
    e.length = e.u2l = e.u2x = e.camel = e.newlines = 0
    e.prev_lower = False


cdef inline void run_end(Est* e) noexcept nogil:
    cdef int L = e.length
    if e.run == R_WORD:
        e.total += (WORD[L] if L < 17 else L * 20) + e.P.u2l * e.u2l + e.P.u2x * e.u2x + e.P.camel * e.camel
    elif e.run == R_DIGIT:
        e.total += (L + 2) // 3 * 100
    elif e.run == R_WS:
        if e.newlines:
            e.total += e.P.newlines
        elif L > 1:
            e.total += e.P.spaces
    elif e.run == R_PUNCT:
        e.total += e.P.punc + (L - 1) * e.P.punc_more
    e.run = R_NONE
    e.length = e.u2l = e.u2x = e.camel = e.newlines = 0
    e.prev_lower = False


cdef inline void run_to(Est* e, int run) noexcept nogil:
    if e.run != run:
        run_end(e)
        e.run = run


cdef inline Py_ssize_t skip_cont(const uchar* p, Py_ssize_t i, Py_ssize_t n, int count) noexcept nogil:
    # the continuation bytes of a multi-byte character (never past a byte that is not one, so a '"' after a
    # truncated character still ends a JSON string)
    while count and i < n and CLS[p[i]] == K_CONT:
        i += 1
        count -= 1
    return i


cdef Py_ssize_t est_feed(Est* e, const uchar* p, Py_ssize_t i, Py_ssize_t n, bint json) noexcept nogil:
    """Price p[i:n]; in json mode stop at the first '"' or '\\' and return its position (else n).
    The hot runs (letters, spaces, digits) are consumed by tight inner loops."""
    cdef uchar k
    cdef int L, camel
    cdef bint lower
    while i < n:
        k = CLS[p[i]]
        if k <= K_UPPER:  # letters
            run_to(e, R_WORD)
            L = e.length
            camel = e.camel
            lower = e.prev_lower
            while True:
                if k == K_LOWER:
                    lower = True
                else:
                    if lower:
                        camel += 1
                    lower = False
                L += 1
                i += 1
                if i >= n:
                    break
                k = CLS[p[i]]
                if k > K_UPPER:
                    break
            e.length = L
            e.camel = camel
            e.prev_lower = lower
        elif k == K_SPACE or k == K_NL:
            run_to(e, R_WS)
            while True:
                e.length += 1
                if k == K_NL:
                    e.newlines += 1
                i += 1
                if i >= n:
                    break
                k = CLS[p[i]]
                if k != K_SPACE and k != K_NL:
                    break
        elif k == K_PUNCT or k == K_STOP or k == K_C2:
            if k == K_STOP and json:
                return i
            run_to(e, R_PUNCT)
            e.length += 1
            i = skip_cont(p, i + 1, n, 1) if k == K_C2 else i + 1
        elif k == K_DIGIT:
            run_to(e, R_DIGIT)
            while True:
                e.length += 1
                i += 1
                if i >= n or CLS[p[i]] != K_DIGIT:
                    break
        elif k == K_U2L or k == K_U2X:
            run_to(e, R_WORD)
            e.length += 1
            if k == K_U2L:
                e.u2l += 1
            else:
                e.u2x += 1
            i = skip_cont(p, i + 1, n, 1)
        elif k == K_CJK or k == K_HANG or k == K_O3:
            run_end(e)
            e.total += e.P.cjk if k == K_CJK else (e.P.hangul if k == K_HANG else e.P.other3)
            i = skip_cont(p, i + 1, n, 2)
        elif k == K_O4:
            run_end(e)
            e.total += e.P.char4
            i = skip_cont(p, i + 1, n, 3)
        else:  # stray continuation bytes and invalid bytes cost nothing
            i += 1
    return n


cdef inline long long est_finish(Est* e) noexcept nogil:
    run_end(e)
    return (e.total + 50) // 100


def estimate_text_tokens(b, str encoding="o200k_base"):
    """Estimated token count of UTF-8 text `b` (bytes; a str is encoded) for `encoding`
    ("o200k_base", the default, or "cl100k_base")."""
    cdef Est e
    if isinstance(b, str):
        b = (<str>b).encode("utf-8", "surrogatepass")
    cdef bytes data = b
    est_init(&e, _prices(encoding))
    est_feed(&e, <const uchar*>PyBytes_AS_STRING(data), 0, PyBytes_GET_SIZE(data), False)
    return est_finish(&e)

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
    const Prices* P
    long long total
    Py_ssize_t messages


cdef inline Py_ssize_t skip_ws(const uchar* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (d[i] == 32 or d[i] == 10 or d[i] == 13 or d[i] == 9):
        i += 1
    return i


cdef Py_ssize_t skip_string(const uchar* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    # d[i] is the opening quote; a quote closes the string when an even number of backslashes precede it
    cdef const uchar* q
    cdef Py_ssize_t j, k
    i += 1
    while i < n:
        q = <const uchar*>memchr(d + i, 34, n - i)
        if q == NULL:
            return -1
        j = q - d
        k = j
        while d[k - 1] == 92:
            k -= 1
        if ((j - k) & 1) == 0:
            return j + 1
        i = j + 1
    return -1


cdef Py_ssize_t skip_value(const uchar* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    cdef uchar c
    cdef Py_ssize_t depth = 0
    if i >= n:
        return -1
    c = d[i]
    if c == 34:
        return skip_string(d, i, n)
    if c == 123 or c == 91:
        while i < n:
            c = d[i]
            if c == 34:
                i = skip_string(d, i, n)
                if i < 0:
                    return -1
                continue
            if c == 123 or c == 91:
                depth += 1
            elif c == 125 or c == 93:
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return -1
    return skip_scalar(d, i, n)


cdef inline Py_ssize_t skip_scalar(const uchar* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t s = i
    cdef uchar c
    while i < n:
        c = d[i]
        if c == 44 or c == 125 or c == 93 or c == 32 or c == 10 or c == 13 or c == 9 or c == 58:
            break
        i += 1
    return i if i > s else -1


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


cdef Py_ssize_t price_string(Walk* w, Py_ssize_t i) noexcept nogil:
    """Price the JSON string at d[i] (opening quote) as its decoded text; position after it, or -1."""
    cdef const uchar* d = w.d
    cdef Py_ssize_t n = w.n
    cdef Est e
    cdef uchar buf[4]
    cdef uchar c
    cdef int cp, lo, blen
    est_init(&e, w.P)
    i += 1
    while True:
        i = est_feed(&e, d, i, n, True)
        if i >= n:
            return -1
        if d[i] == 34:
            w.total += est_finish(&e)
            return i + 1
        # backslash escape
        if i + 1 >= n:
            return -1
        c = d[i + 1]
        i += 2
        if c == 117:  # \uXXXX, surrogate pairs joined, lone surrogates as UTF-8-style bytes (surrogatepass)
            cp = hex4(d, i, n)
            if cp < 0:
                return -1
            i += 4
            if 0xD800 <= cp < 0xDC00 and i + 6 <= n and d[i] == 92 and d[i + 1] == 117:
                lo = hex4(d, i + 2, n)
                if 0xDC00 <= lo < 0xE000:
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                    i += 6
            if cp < 0x80:
                buf[0] = cp
                blen = 1
            elif cp < 0x800:
                buf[0] = 0xC0 | (cp >> 6)
                buf[1] = 0x80 | (cp & 0x3F)
                blen = 2
            elif cp < 0x10000:
                buf[0] = 0xE0 | (cp >> 12)
                buf[1] = 0x80 | ((cp >> 6) & 0x3F)
                buf[2] = 0x80 | (cp & 0x3F)
                blen = 3
            else:
                buf[0] = 0xF0 | (cp >> 18)
                buf[1] = 0x80 | ((cp >> 12) & 0x3F)
                buf[2] = 0x80 | ((cp >> 6) & 0x3F)
                buf[3] = 0x80 | (cp & 0x3F)
                blen = 4
            est_feed(&e, buf, 0, blen, False)
            continue
        if c == 110:
            buf[0] = 10
        elif c == 116:
            buf[0] = 9
        elif c == 114:
            buf[0] = 13
        elif c == 98:
            buf[0] = 8
        elif c == 102:
            buf[0] = 12
        elif c == 34 or c == 92 or c == 47:
            buf[0] = c
        else:
            return -1
        est_feed(&e, buf, 0, 1, False)


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
    with nogil:
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

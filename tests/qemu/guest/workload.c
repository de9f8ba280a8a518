/*
 * umem test guest workload: fill memory with a known per-page pattern, keep
 * rewriting a hot part, verify everything continuously, and report on the
 * serial console.  Built static (gcc -static -O2) and run as the guest's
 * only process besides busybox init.
 *
 * Parameters come from the kernel command line (/proc/cmdline):
 *   wl_mib=N      MiB of memory under test (default 192)
 *   wl_hot_mib=N  MiB at the start that are rewritten continuously (16)
 *   wl_hb_ms=N    heartbeat period in milliseconds (200)
 *   wl_seconds=N  exit after N seconds, 0 = run forever (0)
 *   wl_grow_mib=N MiB more, never touched at start, that the workload
 *                 takes one page every 64 steps while it runs, so it keeps
 *                 writing fresh memory up to (and past) a switch-over (0)
 *
 * Every line starts with "UMEMWL " and is key=value after a tag, times in
 * nanoseconds of CLOCK_MONOTONIC:
 *   UMEMWL START mib= hot_mib= hb_ms= pages= page_size= grow_pages=
 *   UMEMWL FILLED t= ms=
 *   UMEMWL HB seq= t= pass= rewrites=
 *   UMEMWL VERIFY pass= bad= total_bad= t= ms= live=
 *   UMEMWL BAD page= word= got= want= gen=
 *   UMEMWL EXIT total_bad= passes=
 * The heartbeat is driven by time, not by progress: a gap between two HB
 * lines is a stall of the guest.  A bad page is reported and then repaired,
 * so each corruption is counted once.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define WORDS (PAGE_SIZE / sizeof(uint64_t))
#define MAX_BAD_LINES 8 /* BAD lines printed per pass */

static uint64_t *mem;
static uint32_t *gen; /* generation of each page; hot pages move on */
static size_t npages, nhot, live; /* live: pages written so far, grown into */
static uint64_t hb_ns, next_hb, hb_seq, pass, rewrites, total_bad;

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    if ((size_t)n > sizeof(buf) - 2) {
        n = sizeof(buf) - 2;
    }
    buf[n++] = '\n';
    for (char *p = buf; n > 0;) {
        ssize_t w = write(STDOUT_FILENO, p, (size_t)n);

        if (w <= 0) {
            return;
        }
        p += w;
        n -= (int)w;
    }
}

/* splitmix64: a page's tag from its index and generation */
static uint64_t page_tag(size_t page, uint32_t g)
{
    uint64_t z = ((uint64_t)page << 32 | g) + 0x9e3779b97f4a7c15ull;

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void fill_page(size_t page)
{
    uint64_t *w = mem + page * WORDS, v = page_tag(page, gen[page]);

    for (size_t j = 0; j < WORDS; j++) {
        w[j] = v + j * 0x9e3779b97f4a7c15ull;
    }
}

/* Returns 1 if the page was bad (and repairs it). */
static int check_page(size_t page, unsigned *printed)
{
    const uint64_t *w = mem + page * WORDS;
    uint64_t v = page_tag(page, gen[page]);

    for (size_t j = 0; j < WORDS; j++) {
        uint64_t want = v + j * 0x9e3779b97f4a7c15ull;

        if (w[j] != want) {
            if ((*printed)++ < MAX_BAD_LINES) {
                say("UMEMWL BAD page=%zu word=%zu got=%016llx want=%016llx gen=%u",
                    page, j, (unsigned long long)w[j],
                    (unsigned long long)want, gen[page]);
            }
            fill_page(page);
            return 1;
        }
    }
    return 0;
}

static void heartbeat(void)
{
    uint64_t t = now_ns();

    if (t < next_hb) {
        return;
    }
    say("UMEMWL HB seq=%llu t=%llu pass=%llu rewrites=%llu",
        (unsigned long long)hb_seq++, (unsigned long long)t,
        (unsigned long long)pass, (unsigned long long)rewrites);
    next_hb += hb_ns;
    if (next_hb <= t) { /* after a stall, keep the period from now */
        next_hb = t + hb_ns;
    }
}

static unsigned long param(const char *cmdline, const char *key,
                           unsigned long dflt)
{
    size_t len = strlen(key);

    for (const char *p = cmdline; (p = strstr(p, key)) != NULL; p += len) {
        if ((p == cmdline || p[-1] == ' ') && p[len] == '=') {
            return strtoul(p + len + 1, NULL, 0);
        }
    }
    return dflt;
}

int main(void)
{
    char cmdline[4096] = "";
    FILE *f = fopen("/proc/cmdline", "r");
    unsigned long mib, hot_mib, seconds, grow_mib;
    uint64_t start, deadline, t0;
    size_t hot_next = 0;

    if (f) {
        if (!fgets(cmdline, sizeof(cmdline), f)) {
            cmdline[0] = '\0';
        }
        fclose(f);
    }
    mib = param(cmdline, "wl_mib", 192);
    hot_mib = param(cmdline, "wl_hot_mib", 16);
    hb_ns = param(cmdline, "wl_hb_ms", 200) * 1000000ull;
    seconds = param(cmdline, "wl_seconds", 0);
    grow_mib = param(cmdline, "wl_grow_mib", 0);
    if (mib == 0 || hb_ns == 0) {
        say("UMEMWL ERROR wl_mib and wl_hb_ms must be nonzero");
        return 2;
    }
    if (hot_mib > mib) {
        hot_mib = mib;
    }
    live = mib * (1024 * 1024 / PAGE_SIZE);
    npages = live + grow_mib * (1024 * 1024 / PAGE_SIZE);
    nhot = hot_mib * (1024 * 1024 / PAGE_SIZE);
    mem = mmap(NULL, npages * PAGE_SIZE, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    gen = calloc(npages, sizeof(*gen));
    if (mem == MAP_FAILED || !gen) {
        say("UMEMWL ERROR cannot allocate %lu MiB", mib);
        return 2;
    }
    start = now_ns();
    next_hb = start;
    deadline = seconds ? start + seconds * 1000000000ull : UINT64_MAX;
    say("UMEMWL START mib=%lu hot_mib=%lu hb_ms=%llu pages=%zu page_size=%u grow_pages=%zu",
        mib, hot_mib, (unsigned long long)(hb_ns / 1000000), live,
        PAGE_SIZE, npages - live);

    for (size_t i = 0; i < live; i++) {
        fill_page(i);
        if ((i & 15) == 0) {
            heartbeat();
        }
    }
    t0 = now_ns();
    say("UMEMWL FILLED t=%llu ms=%llu", (unsigned long long)t0,
        (unsigned long long)((t0 - start) / 1000000));

    /* Each step verifies one page and rewrites one hot page. */
    while (now_ns() < deadline) {
        unsigned printed = 0;
        uint64_t bad = 0;

        size_t checked = live;

        pass++;
        t0 = now_ns();
        for (size_t i = 0; i < checked; i++) {
            bad += check_page(i, &printed);
            if ((i & 63) == 0 && live < npages) {
                fill_page(live++); /* a page never touched before */
            }
            if (nhot) {
                gen[hot_next]++;
                fill_page(hot_next);
                rewrites++;
                hot_next = (hot_next + 1) % nhot;
            }
            if ((i & 15) == 0) {
                heartbeat();
            }
        }
        total_bad += bad;
        say("UMEMWL VERIFY pass=%llu bad=%llu total_bad=%llu t=%llu ms=%llu live=%zu",
            (unsigned long long)pass, (unsigned long long)bad,
            (unsigned long long)total_bad, (unsigned long long)now_ns(),
            (unsigned long long)((now_ns() - t0) / 1000000), live);
    }
    say("UMEMWL EXIT total_bad=%llu passes=%llu",
        (unsigned long long)total_bad, (unsigned long long)pass);
    return total_bad ? 1 : 0;
}

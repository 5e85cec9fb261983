/* rtc: CMOS real-time clock (ports 0x70/0x71): update-in-progress handling, plausible BCD or
 * binary values, a consistent double read, the clock advancing, status register D. Prints
 * "RTC YYYY-MM-DD hh:mm:ss" (the VMM's time of day; the test compares it with the host's UTC). */
#include "rt.h"

const char rt_program_name[] = "rtc";

static uint8_t cmos(uint8_t reg) { outb(0x70, reg); return inb(0x71); }
static int bcd_ok(uint8_t v) { return (v & 0x0f) <= 9 && (v >> 4) <= 9; }
static uint8_t bcd(uint8_t v) { return (uint8_t)((v >> 4) * 10 + (v & 0x0f)); }

struct tm { uint8_t sec, min, hour, day, mon, year, cent; };

/* Waits (bounded) for UIP to clear, then reads the time registers. Returns 0 on timeout. */
static int read_raw(struct tm *t) {
    uint64_t end = rt_deadline(3000);
    while (cmos(0x0a) & 0x80) if (rt_expired(end)) return 0;
    t->sec = cmos(0x00); t->min = cmos(0x02); t->hour = cmos(0x04);
    t->day = cmos(0x07); t->mon = cmos(0x08); t->year = cmos(0x09); t->cent = cmos(0x32);
    return 1;
}
static int same(const struct tm *a, const struct tm *b) { return !memcmp(a, b, sizeof *a); }

int main(void) {
    uint8_t a = cmos(0x0a), b = cmos(0x0b), d = cmos(0x0d);
    int binary = b & 0x04, h24 = b & 0x02;
    rt_printf("# status A %x B %x D %x (%s, %s)\n", a, b, d, binary ? "binary" : "BCD", h24 ? "24-hour" : "12-hour");
    rt_check("rtc-status-d-valid", d & 0x80, "register D %x (bit 7: valid RAM and time)", d);

    struct tm t1, t2;
    int tries = 0, ok = 0;
    while (tries++ < 5) {
        if (!read_raw(&t1) || !read_raw(&t2)) break;
        if (same(&t1, &t2)) { ok = 1; break; }
    }
    if (!rt_check("rtc-consistent-read", ok, "%d tries (UIP cleared, two equal reads)", tries)) return 0;

    int valid = 1;
    if (!binary) valid = bcd_ok(t1.sec) && bcd_ok(t1.min) && bcd_ok(t1.hour & 0x7f) && bcd_ok(t1.day) &&
                         bcd_ok(t1.mon) && bcd_ok(t1.year) && bcd_ok(t1.cent);
    uint8_t pm = !h24 && (t1.hour & 0x80);
    uint8_t sec = binary ? t1.sec : bcd(t1.sec), min = binary ? t1.min : bcd(t1.min);
    uint8_t hour = binary ? (t1.hour & 0x7f) : bcd(t1.hour & 0x7f);
    uint8_t day = binary ? t1.day : bcd(t1.day), mon = binary ? t1.mon : bcd(t1.mon);
    uint8_t year = binary ? t1.year : bcd(t1.year), cent = binary ? t1.cent : bcd(t1.cent);
    if (!h24) hour = (uint8_t)(hour % 12 + (pm ? 12 : 0));
    rt_check("rtc-bcd-digits", valid, "raw %x %x %x %x %x %x %x (%s)", t1.cent, t1.year, t1.mon, t1.day, t1.hour, t1.min, t1.sec,
             binary ? "binary mode" : "each nibble 0-9");
    rt_check("rtc-ranges", sec < 60 && min < 60 && hour < 24 && day >= 1 && day <= 31 && mon >= 1 && mon <= 12,
             "%02u-%02u %02u:%02u:%02u", mon, day, hour, min, sec);
    uint32_t full_year = (cent ? cent : 20) * 100u + year;
    rt_check("rtc-year", full_year >= 2024 && full_year < 2100, "year %u (century register %u)", full_year, cent);
    rt_printf("RTC %u-%02u-%02u %02u:%02u:%02u\n", full_year, mon, day, hour, min, sec);

    /* The clock advances: wait (up to ~3 s) for the seconds register to change. */
    uint64_t end = rt_deadline(3000);
    struct tm t3 = t1;
    while (!rt_expired(end)) {
        if (!read_raw(&t3)) break;
        if (t3.sec != t1.sec) break;
    }
    rt_check("rtc-advances", t3.sec != t1.sec, "seconds %x → %x", t1.sec, t3.sec);
    return 0;
}

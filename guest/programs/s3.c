/* s3: ACPI suspend to RAM and resume (issue 14 part 6). The program puts the runtime's real-mode trampoline in the
 * FACS firmware waking vector, arms the RTC alarm two seconds ahead with PM1_EN.RTC_EN, and writes SLP_TYP of \_S3
 * with SLP_EN to PM1a_CNT. The VMM parks and resets the vCPUs, sleeps until the alarm, and starts vCPU 0 in real
 * mode at the waking vector; the trampoline enters long mode and calls resumed(), which checks that RAM kept its
 * contents, PM1_STS shows WAK_STS and RTC_STS, and execution did not simply continue after the write. */
#include "rt.h"

const char rt_program_name[] = "s3";

static volatile uint64_t marker;
static volatile int continued;

static uint8_t cmos(uint8_t r) { outb(0x70, r); return inb(0x71); }
static void cmos_set(uint8_t r, uint8_t v) { outb(0x70, r); outb(0x71, v); }
static uint8_t bcd(uint8_t v) { return (uint8_t)(((v / 10) << 4) | (v % 10)); }
static uint8_t unbcd(uint8_t v) { return (uint8_t)((v >> 4) * 10 + (v & 0xf)); }

static void resumed(uint32_t id) {
    uint16_t sts = inw(0x600);
    rt_check("resumed", id == 0 && !continued, "resumed at the waking vector on APIC ID %u", id);
    rt_check("ram-kept", marker == 0x5eed5eed5eedULL, "marker %lx", (uint64_t)marker);
    rt_check("wake-status", (sts & 0x8000) && (sts & 0x0400), "PM1_STS %x (WAK_STS 0x8000, RTC_STS 0x400)", sts);
    rt_finish();
}

int main(void) {
    const uint8_t *fadt = rt_acpi_table("FACP");
    const uint8_t *dsdt = fadt ? (const uint8_t *)(uintptr_t)*(const uint32_t *)(fadt + 40) : 0;
    rt_check("fadt", fadt != 0, "FADT at %p", (const void *)fadt);
    if (!fadt) return 0;
    /* \_S3 in the DSDT: its SLP_TYP (the first package element). */
    uint8_t slp_typ = 0xff;
    uint32_t dlen = dsdt ? *(const uint32_t *)(dsdt + 4) : 0;
    for (uint32_t i = 36; i + 8 < dlen; i++)
        if (dsdt[i] == 0x08 && dsdt[i + 1] == '_' && dsdt[i + 2] == 'S' && dsdt[i + 3] == '3' && dsdt[i + 4] == '_' && dsdt[i + 5] == 0x12) {
            const uint8_t *e = dsdt + i + 8;   /* PackageOp, PkgLength (1 byte), NumElements, first element */
            slp_typ = e[0] == 0x0a ? e[1] : e[0] == 0x01 ? 1 : e[0] == 0x00 ? 0 : 0xff;
            break;
        }
    rt_check("dsdt-s3", slp_typ != 0xff, "\\_S3 SLP_TYP %u", slp_typ);
    uint8_t *facs = (uint8_t *)(uintptr_t)*(const uint32_t *)(fadt + 36);
    rt_check("facs", facs && facs[0] == 'F' && facs[1] == 'A' && facs[2] == 'C' && facs[3] == 'S', "FACS at %p", (void *)facs);
    uint32_t vector = rt_prepare_wake(resumed);
    *(volatile uint32_t *)(facs + 12) = vector;
    marker = 0x5eed5eed5eedULL;

    /* The RTC alarm two seconds from now (seconds only; minutes and hours "don't care"), then RTC_EN. */
    while (cmos(0x0a) & 0x80) {}
    uint8_t sec = cmos(0x00), b = cmos(0x0b);
    int is_bcd = !(b & 0x04);
    uint8_t s = (uint8_t)(((is_bcd ? unbcd(sec) : sec) + 2) % 60);
    cmos_set(0x01, is_bcd ? bcd(s) : s);
    cmos_set(0x03, 0xc0);
    cmos_set(0x05, 0xc0);
    (void)cmos(0x0c);                                  /* clear the flags */
    outw(0x600, 0xffff);                               /* clear PM1 status */
    outw(0x602, 0x0400);                               /* RTC_EN */
    rt_printf("S3-SLEEP slp_typ %u vector %x alarm second %u\n", slp_typ, vector, s);
    outw(0x604, (uint16_t)((slp_typ << 10) | (1 << 13)));
    /* A VMM without S3 returns here (or reports WAK_STS at once). */
    continued = 1;
    for (volatile int i = 0; i < 1000000; i++) {}
    rt_check("resumed", 0, "execution continued after the sleep request");
    return 0;
}

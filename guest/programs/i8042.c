/* i8042: system reset through the keyboard controller (command 0xFE on port 0x64).
 * Prints "I8042-RESET-REQUESTED" and writes the command; the VMM must report a reset (QEMU with
 * -no-reboot exits with status 0). If the program still runs ~2 s later it reports a failure. */
#include "rt.h"

const char rt_program_name[] = "i8042";

int main(void) {
    uint8_t status = inb(0x64);
    rt_check("i8042-status", status != 0xff, "status port 0x64 reads %x", status);
    for (int i = 0; i < 1000 && (inb(0x64) & 0x02); i++) cpu_pause();   /* input buffer empty */
    rt_printf("I8042-RESET-REQUESTED\n");
    outb(0x64, 0xfe);
    uint64_t end = rt_deadline(2000);
    while (!rt_expired(end)) cpu_pause();
    rt_fail("i8042-reset", "still running ~2 s after writing 0xfe to port 0x64");
    return 0;
}

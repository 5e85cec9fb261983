#ifndef CNET_H
#define CNET_H
/*
 * C shim for the network backends: the TUN/TAP and interface ioctls take a struct ifreq (a
 * union) and numbers built with _IOW, neither of which imports into Swift cleanly. Every
 * function returns a value >= 0 or -errno.
 */
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

/* TUN_F_* offload flags for cnet_tap_set_offload. */
#define CNET_TUN_F_CSUM    0x01
#define CNET_TUN_F_TSO4    0x02
#define CNET_TUN_F_TSO6    0x04
#define CNET_TUN_F_TSO_ECN 0x08
#define CNET_TUN_F_UFO     0x10

/// Opens /dev/net/tun (O_RDWR | O_NONBLOCK | O_CLOEXEC) and attaches it to the TAP `name`
/// (IFF_TAP | IFF_NO_PI, plus IFF_VNET_HDR when `vnet_hdr`). An empty name lets the kernel pick
/// one ("tap%d"), creating a TAP that lives as long as the fd. The actual name is copied to
/// `actual` (16 bytes). Returns the fd or -errno.
int cnet_tap_open(const char *name, int vnet_hdr, char *actual);
/// TUNGETIFF on an fd that was passed in: its interface name (16 bytes) and IFF_* flags.
int cnet_tap_get_iff(int fd, char *name, int *flags);
/// TUNSETIFF on an already opened /dev/net/tun fd. Returns 0 or -errno.
int cnet_tap_set_iff(int fd, const char *name, int flags, char *actual);
/// TUNSETOFFLOAD with CNET_TUN_F_* flags.
int cnet_tap_set_offload(int fd, unsigned int flags);
/// TUNSETVNETHDRSZ.
int cnet_tap_set_vnet_hdr_size(int fd, int size);
/// The interface's index (SIOCGIFINDEX), or -errno (-ENODEV when it does not exist).
int cnet_if_index(const char *name);
/// Sets IFF_UP on the interface (SIOCGIFFLAGS + SIOCSIFFLAGS).
int cnet_if_set_up(const char *name);
/// Adds interface `ifname` to bridge `bridge` (SIOCBRADDIF).
int cnet_bridge_add_if(const char *bridge, const char *ifname);
/// IFF_* values the Swift side needs.
int cnet_iff_tap(void);
int cnet_iff_no_pi(void);
int cnet_iff_vnet_hdr(void);
int cnet_iff_multi_queue(void);
/// readv/writev returning the count or -errno.
ssize_t cnet_readv(int fd, const struct iovec *iov, int count);
ssize_t cnet_writev(int fd, const struct iovec *iov, int count);
#endif

#define _GNU_SOURCE
#include "CNet.h"
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

static void copy_name(char *dst, const char *src) {
    memset(dst, 0, IFNAMSIZ);
    strncpy(dst, src, IFNAMSIZ - 1);
}

int cnet_tap_set_iff(int fd, const char *name, int flags, char *actual) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    copy_name(ifr.ifr_name, name);
    ifr.ifr_flags = (short)flags;
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) return -errno;
    if (actual) copy_name(actual, ifr.ifr_name);
    return 0;
}

int cnet_tap_open(const char *name, int vnet_hdr, char *actual) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -errno;
    int flags = IFF_TAP | IFF_NO_PI | (vnet_hdr ? IFF_VNET_HDR : 0);
    int r = cnet_tap_set_iff(fd, name, flags, actual);
    if (r < 0) { close(fd); return r; }
    return fd;
}

int cnet_tap_get_iff(int fd, char *name, int *flags) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    if (ioctl(fd, TUNGETIFF, &ifr) < 0) return -errno;
    copy_name(name, ifr.ifr_name);
    *flags = ifr.ifr_flags & 0xffff;
    return 0;
}

int cnet_tap_set_offload(int fd, unsigned int flags) {
    return ioctl(fd, TUNSETOFFLOAD, (unsigned long)flags) < 0 ? -errno : 0;
}

int cnet_tap_set_vnet_hdr_size(int fd, int size) {
    return ioctl(fd, TUNSETVNETHDRSZ, &size) < 0 ? -errno : 0;
}

static int with_socket(unsigned long request, struct ifreq *ifr) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -errno;
    int r = ioctl(s, request, ifr) < 0 ? -errno : 0;
    close(s);
    return r;
}

int cnet_if_index(const char *name) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    copy_name(ifr.ifr_name, name);
    int r = with_socket(SIOCGIFINDEX, &ifr);
    return r < 0 ? r : ifr.ifr_ifindex;
}

int cnet_if_set_up(const char *name) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    copy_name(ifr.ifr_name, name);
    int r = with_socket(SIOCGIFFLAGS, &ifr);
    if (r < 0) return r;
    ifr.ifr_flags |= IFF_UP;
    return with_socket(SIOCSIFFLAGS, &ifr);
}

int cnet_bridge_add_if(const char *bridge, const char *ifname) {
    int index = cnet_if_index(ifname);
    if (index < 0) return index;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    copy_name(ifr.ifr_name, bridge);
    ifr.ifr_ifindex = index;
    return with_socket(SIOCBRADDIF, &ifr);
}

int cnet_iff_tap(void) { return IFF_TAP; }
int cnet_iff_no_pi(void) { return IFF_NO_PI; }
int cnet_iff_vnet_hdr(void) { return IFF_VNET_HDR; }
int cnet_iff_multi_queue(void) { return IFF_MULTI_QUEUE; }

ssize_t cnet_readv(int fd, const struct iovec *iov, int count) {
    ssize_t n = readv(fd, iov, count);
    return n < 0 ? -errno : n;
}

ssize_t cnet_writev(int fd, const struct iovec *iov, int count) {
    ssize_t n = writev(fd, iov, count);
    return n < 0 ? -errno : n;
}

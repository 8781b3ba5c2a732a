/* Level-2 guest program for the virgl e2e check (built static by tests/e2e/images.py).
 *
 * Through Linux's virtio_gpu DRM driver (the stock kernel's, against vmm's device): the
 * 3D feature parameter, the virgl capset, then one render the way Mesa's virgl driver
 * would do it: a BGRA render target (RESOURCE_CREATE), a command stream that makes a
 * surface of it, binds it as the framebuffer and CLEARs it (EXECBUFFER), the pixels
 * brought back into the guest (TRANSFER_FROM_HOST, WAIT) and checked through a mapping.
 * Prints "E2E: key=value" markers; exits 0 when every step worked.
 *
 * The uapi structures and ioctl numbers are from include/uapi/drm/virtgpu_drm.h (Debian's
 * linux-libc-dev does not ship the DRM headers); the command encoding is virglrenderer's
 * virgl_protocol.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/ioctl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define DRM_IOCTL_BASE 'd'
#define DRM_COMMAND_BASE 0x40
#define VIRTGPU_IOWR(nr, type) _IOWR(DRM_IOCTL_BASE, DRM_COMMAND_BASE + (nr), type)
#define VIRTGPU_IOW(nr, type) _IOW(DRM_IOCTL_BASE, DRM_COMMAND_BASE + (nr), type)

struct virtgpu_map { uint64_t offset; uint32_t handle, pad; };
struct virtgpu_execbuffer {
    uint32_t flags, size;
    uint64_t command, bo_handles;
    uint32_t num_bo_handles;
    int32_t fence_fd;
};
struct virtgpu_getparam { uint64_t param, value; };
struct virtgpu_resource_create {
    uint32_t target, format, bind, width, height, depth, array_size, last_level,
             nr_samples, flags, bo_handle, res_handle, size, stride;
};
struct virtgpu_box { uint32_t x, y, z, w, h, d; };
struct virtgpu_transfer {
    uint32_t bo_handle;
    struct virtgpu_box box;
    uint32_t level, offset, stride, layer_stride;
};
struct virtgpu_wait { uint32_t handle, flags; };
struct virtgpu_get_caps { uint32_t cap_set_id, cap_set_ver; uint64_t addr; uint32_t size, pad; };

#define IOCTL_MAP VIRTGPU_IOWR(0x01, struct virtgpu_map)
#define IOCTL_EXECBUFFER VIRTGPU_IOW(0x02, struct virtgpu_execbuffer)
#define IOCTL_GETPARAM VIRTGPU_IOWR(0x03, struct virtgpu_getparam)
#define IOCTL_RESOURCE_CREATE VIRTGPU_IOWR(0x04, struct virtgpu_resource_create)
#define IOCTL_TRANSFER_FROM_HOST VIRTGPU_IOWR(0x06, struct virtgpu_transfer)
#define IOCTL_WAIT VIRTGPU_IOWR(0x08, struct virtgpu_wait)
#define IOCTL_GET_CAPS VIRTGPU_IOWR(0x09, struct virtgpu_get_caps)

#define W 64
#define H 64
#define FORMAT_B8G8R8A8_UNORM 1
#define BIND_RENDER_TARGET (1u << 1)
#define BIND_SAMPLER_VIEW (1u << 3)
#define PIPE_TEXTURE_2D 2
/* virgl_protocol.h: header = cmd | object << 8 | dwords-after-it << 16 */
#define CMD0(cmd, obj, len) ((uint32_t)(cmd) | (uint32_t)(obj) << 8 | (uint32_t)(len) << 16)
#define CCMD_CREATE_OBJECT 1
#define CCMD_SET_FRAMEBUFFER_STATE 5
#define CCMD_CLEAR 7
#define OBJECT_SURFACE 8
#define PIPE_CLEAR_COLOR0 (1u << 2)

static const uint8_t rgba[4] = {51, 102, 153, 255};   /* exact in unorm8 */

static uint32_t f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static int fail(const char *what)
{
    printf("E2E: virgl-failed=%s errno=%d\n", what, errno);
    return 1;
}

static int caps(int fd)
{
    struct virtgpu_getparam gp = {.param = 1 /* VIRTGPU_PARAM_3D_FEATURES */};
    uint64_t value = 0;
    gp.value = (uint64_t)(uintptr_t)&value;
    if (ioctl(fd, IOCTL_GETPARAM, &gp))
        return fail("getparam");
    printf("E2E: virgl-3d-features=%llu\n", (unsigned long long)value);
    static uint32_t buf[1024];
    struct virtgpu_get_caps gc = {.cap_set_id = 1, .cap_set_ver = 1,
                                  .addr = (uint64_t)(uintptr_t)buf, .size = sizeof(buf)};
    if (ioctl(fd, IOCTL_GET_CAPS, &gc))
        return fail("get-caps");
    printf("E2E: virgl-caps-max-version=%u\n", buf[0]);
    return value == 1 ? 0 : 1;
}

static int render(int fd)
{
    struct virtgpu_resource_create rc = {
        .target = PIPE_TEXTURE_2D, .format = FORMAT_B8G8R8A8_UNORM,
        .bind = BIND_RENDER_TARGET | BIND_SAMPLER_VIEW, .width = W, .height = H,
        .depth = 1, .array_size = 1, .size = W * H * 4, .stride = W * 4};
    if (ioctl(fd, IOCTL_RESOURCE_CREATE, &rc))
        return fail("resource-create");
    double depth = 1.0;
    uint32_t d[2];
    memcpy(d, &depth, 8);
    uint32_t cmd[] = {
        CMD0(CCMD_CREATE_OBJECT, OBJECT_SURFACE, 5), 1, rc.res_handle,
        FORMAT_B8G8R8A8_UNORM, 0, 0,
        CMD0(CCMD_SET_FRAMEBUFFER_STATE, 0, 3), 1, 0, 1,
        CMD0(CCMD_CLEAR, 0, 8), PIPE_CLEAR_COLOR0, f32(rgba[0] / 255.0f),
        f32(rgba[1] / 255.0f), f32(rgba[2] / 255.0f), f32(rgba[3] / 255.0f), d[0], d[1], 0,
    };
    struct virtgpu_execbuffer eb = {
        .size = sizeof(cmd), .command = (uint64_t)(uintptr_t)cmd,
        .bo_handles = (uint64_t)(uintptr_t)&rc.bo_handle, .num_bo_handles = 1,
        .fence_fd = -1};
    if (ioctl(fd, IOCTL_EXECBUFFER, &eb))
        return fail("execbuffer");
    /* stride 0: the resource's own (Linux refuses a stride for non-blob resources) */
    struct virtgpu_transfer t = {.bo_handle = rc.bo_handle, .box = {0, 0, 0, W, H, 1}};
    if (ioctl(fd, IOCTL_TRANSFER_FROM_HOST, &t))
        return fail("transfer-from-host");
    struct virtgpu_wait wt = {.handle = rc.bo_handle};
    if (ioctl(fd, IOCTL_WAIT, &wt))
        return fail("wait");
    struct virtgpu_map mp = {.handle = rc.bo_handle};
    if (ioctl(fd, IOCTL_MAP, &mp))
        return fail("map");
    uint8_t *px = mmap(NULL, W * H * 4, PROT_READ, MAP_SHARED, fd, (off_t)mp.offset);
    if (px == MAP_FAILED)
        return fail("mmap");
    int bad = 0;
    for (int i = 0; i < W * H; i++)      /* BGRA in memory */
        bad += px[4 * i] != rgba[2] || px[4 * i + 1] != rgba[1] ||
               px[4 * i + 2] != rgba[0] || px[4 * i + 3] != rgba[3];
    printf("E2E: virgl-first-pixel=%u,%u,%u,%u virgl-bad-pixels=%d\n", px[0], px[1], px[2],
           px[3], bad);
    return bad != 0;
}

int main(void)
{
    int fd = open("/dev/dri/card0", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return fail("open-card0");
    int status = caps(fd) || render(fd);
    printf("E2E: virgl-check=%s\n", status ? "failed" : "ok");
    return status;
}

#!/bin/busybox sh
# /init of the lab's initramfs, run by busybox ash as PID 1 (see lab/README.md).
#
# Serial ports (set up by lab/run):
#   ttyS0  the command's stdout and stderr (streamed to the host's stdout)
#   ttyS1  the kernel console and this script's own messages (a log file on the host)
#   ttyS2  one status line for the host: LAB-EXIT-STATUS=<n> or LAB-SETUP-FAILED=<why>
#
# Kernel command line (read from /proc/cmdline):
#   lab.cmd=<base64>     the command script (POSIX sh) to run inside the chroot, or
#   lab.script=<path>    a host path of that script, for scripts too long for the line
#   lab.tty=1            give the command the serial tty itself (else a pipe)
#   <module>.<p>=<v>     a parameter for one of the modules loaded here (kvm_amd.npt=0)

set -f  # no globbing: the command line is split into words below
/bin/busybox mkdir -p /bin /proc /sys /dev
/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

status() {
    # Open, write and close: the last close of a tty waits until the bytes are sent.
    echo "$1" > /dev/ttyS2
}

fail() {
    echo "lab-init: $*"
    status "LAB-SETUP-FAILED=$*"
    poweroff -f
    sleep 60
}

cmdline=$(cat /proc/cmdline)

# Load the modules in dependency order, with any <module>.<param>=<value> arguments.
while read -r mod; do
    params=""
    for arg in $cmdline; do
        case "$arg" in
            "$mod".*=*) params="$params ${arg#"$mod".}" ;;
        esac
    done
    # shellcheck disable=SC2086  # params is a word list on purpose
    insmod "/lib/modules/$mod.ko" $params || fail "insmod $mod failed"
done < /etc/lab-modules
echo "lab-init: modules loaded"

# The host root, read-only over 9p, with a RAM-backed overlay on top.
mkdir -p /mnt/lower /mnt/rw /mnt/root
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /mnt/lower \
    || fail "cannot mount the host root over 9p"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw || fail "cannot mount the overlay's tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay overlay \
    -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /mnt/root \
    || fail "cannot mount the overlay"

root=/mnt/root
mount -t proc proc "$root/proc" || fail "cannot mount /proc in the chroot"
mount -t sysfs sysfs "$root/sys" || fail "cannot mount /sys in the chroot"
mount -t devtmpfs devtmpfs "$root/dev" || fail "cannot mount /dev in the chroot"
mkdir -p "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
mount -t tmpfs -o mode=0755 tmpfs "$root/run" || fail "cannot mount /run in the chroot"
mkdir -p "$root/run/lab"

# The command script.
script=""
for arg in $cmdline; do
    case "$arg" in
        lab.cmd=*) echo "${arg#lab.cmd=}" | base64 -d > "$root/run/lab/cmd.sh" \
            || fail "cannot decode lab.cmd"; script=yes ;;
        lab.script=*) cp "/mnt/lower${arg#lab.script=}" "$root/run/lab/cmd.sh" \
            || fail "cannot read ${arg#lab.script=}"; script=yes ;;
    esac
done
[ -n "$script" ] || fail "no lab.cmd= or lab.script= on the kernel command line"

echo "lab-init: running the command"
# Raw output: no \n -> \r\n translation, no echo.
stty -F /dev/ttyS0 raw -echo 2>/dev/null

# With lab.tty=1 (the host's stdout is a terminal) the command writes to the serial tty
# itself; otherwise through a pipe, so it does not see a terminal (no colours, no paging).
run_command() {
    env -i /bin/chroot "$root" /bin/sh /run/lab/cmd.sh < /dev/null 2>&1
}
# shellcheck disable=SC3040  # busybox ash has pipefail
set -o pipefail
case " $cmdline " in
    *" lab.tty=1 "*) run_command > /dev/ttyS0 ;;
    *) run_command | cat > /dev/ttyS0 ;;
esac
status "LAB-EXIT-STATUS=$?"
poweroff -f
sleep 60

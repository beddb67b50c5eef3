package procfs

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// userHZ is the unit of /proc/<pid>/stat's times: USER_HZ, 100 on every
// Linux architecture (the kernel converts to it whatever its own HZ).
const userHZ = 100

// commLen is the kernel's TASK_COMM_LEN less the terminating NUL.
const commLen = 15

// SetComm names every thread of the calling process name (cut to the
// kernel's 15 bytes), as ps, top and ss show it. A process started through a
// /proc/self/exe or /proc/self/fd/N path is named "exe" or "N" by the
// kernel, after the last element of the path it was started through.
//
// A thread takes its name from the thread that creates it, so once every
// thread is renamed the runtime's later threads are too; the loop goes on
// until a pass finds no thread left to rename, in case one was created
// by a thread not yet renamed.
func SetComm(name string) error {
	if len(name) > commLen {
		name = name[:commLen]
	}
	want := []byte(name)
	for range 10 {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return fmt.Errorf("name the process %q: %w", name, err)
		}
		renamed := 0
		for _, t := range tasks {
			path := "/proc/self/task/" + t.Name() + "/comm"
			cur, err := os.ReadFile(path)
			if err != nil {
				continue // a thread that ended
			}
			if bytes.Equal(bytes.TrimSuffix(cur, []byte{'\n'}), want) {
				continue
			}
			if err := os.WriteFile(path, want, 0); err != nil {
				if _, gone := os.Stat(path); gone != nil {
					continue
				}
				return fmt.Errorf("name the process %q: %w", name, err)
			}
			renamed++
		}
		if renamed == 0 {
			return nil
		}
	}
	return fmt.Errorf("name the process %q: threads kept appearing with another name", name)
}

// StartTime returns when process pid started, from the starttime field of
// /proc/<pid>/stat (clock ticks since boot, counted on the boot clock, which
// runs on through suspend) and the boot clock now. It is good to a tick
// (10ms).
func StartTime(pid int) (time.Time, error) {
	path := "/proc/" + strconv.Itoa(pid) + "/stat"
	b, err := os.ReadFile(path)
	if err != nil {
		return time.Time{}, fmt.Errorf("read the start time of pid %d: %w", pid, err)
	}
	ticks, err := parseStatStartTime(b)
	if err != nil {
		return time.Time{}, fmt.Errorf("read the start time of pid %d: %s: %w", pid, path, err)
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return time.Time{}, fmt.Errorf("read the start time of pid %d: boot clock: %w", pid, err)
	}
	now := time.Now()
	since := time.Duration(ts.Nano()) - time.Duration(ticks)*(time.Second/userHZ)
	return now.Add(-since), nil
}

// parseStatStartTime returns field 22 of a /proc/<pid>/stat line. The
// second field, the command in parentheses, may hold spaces and
// parentheses itself: the fields are counted from its last ')'.
func parseStatStartTime(b []byte) (uint64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("no command field in %q", b)
	}
	// After ") ": state is field 3, so starttime (22) is the 20th.
	f := bytes.Fields(b[i+1:])
	if len(f) < 20 {
		return 0, fmt.Errorf("%d fields after the command, want at least 20", len(f))
	}
	v, err := strconv.ParseUint(string(f[19]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse starttime %q: %w", f[19], err)
	}
	return v, nil
}

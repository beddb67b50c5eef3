// Package procfs reads the few /proc facts the master needs about itself and
// its workers. The master measures workers itself rather than trusting what
// they report.
package procfs

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Capability bits (linux/capability.h).
const (
	CapKill     = 5
	CapSetGID   = 6
	CapSetUID   = 7
	CapNetAdmin = 12
)

// Status holds fields of /proc/<pid>/status.
type Status struct {
	CapEff     uint64 // effective capabilities
	CapPrm     uint64 // permitted capabilities
	CapAmb     uint64 // ambient capabilities: kept across execve of a plain file
	CapInh     uint64 // inheritable capabilities
	UID, GID   [4]int // real, effective, saved set and filesystem ids; -1 if absent
	RSSBytes   uint64 // VmRSS
	Threads    int
	NoNewPrivs bool // the no_new_privs bit (shown since Linux 4.10; false before)
}

// HasCap reports whether the effective set holds capability c.
func (s *Status) HasCap(c int) bool { return s.CapEff&(1<<uint(c)) != 0 }

// ReadStatus reads /proc/<pid>/status; pid 0 means the calling process.
func ReadStatus(pid int) (*Status, error) {
	path := "/proc/self/status"
	if pid != 0 {
		path = "/proc/" + strconv.Itoa(pid) + "/status"
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseStatus(b)
}

// ParseStatus parses the text of a /proc/<pid>/status file.
func ParseStatus(b []byte) (*Status, error) {
	s := Status{UID: [4]int{-1, -1, -1, -1}, GID: [4]int{-1, -1, -1, -1}}
	var sawCap bool
	for len(b) > 0 {
		var line []byte
		line, b, _ = bytes.Cut(b, []byte{'\n'})
		key, val, ok := bytes.Cut(line, []byte{':'})
		if !ok {
			continue
		}
		val = bytes.TrimSpace(val)
		switch string(key) {
		case "CapEff":
			v, err := strconv.ParseUint(string(val), 16, 64)
			if err != nil {
				return nil, fmt.Errorf("parse CapEff %q: %w", val, err)
			}
			s.CapEff, sawCap = v, true
		case "CapPrm", "CapAmb", "CapInh":
			v, err := strconv.ParseUint(string(val), 16, 64)
			if err != nil {
				return nil, fmt.Errorf("parse %s %q: %w", key, val, err)
			}
			switch string(key) {
			case "CapPrm":
				s.CapPrm = v
			case "CapAmb":
				s.CapAmb = v
			default:
				s.CapInh = v
			}
		case "NoNewPrivs":
			s.NoNewPrivs = string(val) == "1"
		case "Uid", "Gid":
			ids := &s.UID
			if string(key) == "Gid" {
				ids = &s.GID
			}
			for i, f := range strings.Fields(string(val)) {
				if i >= len(ids) {
					break
				}
				v, err := strconv.Atoi(f)
				if err != nil {
					return nil, fmt.Errorf("parse %s %q: %w", key, val, err)
				}
				ids[i] = v
			}
		case "VmRSS":
			v, err := parseKB("VmRSS", val)
			if err != nil {
				return nil, err
			}
			s.RSSBytes = v
		case "Threads":
			v, err := strconv.Atoi(string(val))
			if err != nil {
				return nil, fmt.Errorf("parse Threads %q: %w", val, err)
			}
			s.Threads = v
		}
	}
	if !sawCap {
		return nil, fmt.Errorf("no CapEff line in status")
	}
	return &s, nil
}

// Memory is a process's memory as the kernel accounts it.
type Memory struct {
	RSSBytes uint64 // VmRSS of /proc/<pid>/status
	// PSSBytes is Pss of /proc/<pid>/smaps_rollup: resident memory with
	// each shared page divided among its sharers, so workers forked from
	// one binary are not charged each for the whole text. 0 where the
	// kernel has no smaps_rollup (before 4.14).
	PSSBytes uint64
}

// Sampler reads Memory for many processes, reusing one buffer: the master
// samples every worker every monitor interval and should not allocate a
// file's worth of garbage for each. A Sampler is not safe for concurrent
// use.
type Sampler struct{ buf []byte }

// Memory reads pid's RSS and PSS. A process without smaps_rollup (old
// kernel) has PSS 0 and no error; a process that is gone is an error
// wrapping fs.ErrNotExist.
func (s *Sampler) Memory(pid int) (Memory, error) {
	var m Memory
	var err error
	if m.RSSBytes, err = s.RSS(pid); err != nil {
		return m, err
	}
	dir := "/proc/" + strconv.Itoa(pid) + "/"
	b, err := s.read(dir + "smaps_rollup")
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// Either the kernel predates smaps_rollup or the process just
		// exited; status was readable, so report what we have.
		return m, nil
	case err != nil:
		return m, err
	}
	if m.PSSBytes, err = ParseSmapsRollup(b); err != nil {
		return m, fmt.Errorf("%ssmaps_rollup: %w", dir, err)
	}
	return m, nil
}

// RSS reads pid's VmRSS alone, the cheap part of Memory.
func (s *Sampler) RSS(pid int) (uint64, error) {
	path := "/proc/" + strconv.Itoa(pid) + "/status"
	b, err := s.read(path)
	if err != nil {
		return 0, err
	}
	v, err := parseStatusRSS(b)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return v, nil
}

// UserHZ is the unit of /proc's CPU times: the kernel reports them in
// USER_HZ, 100 a second on every architecture Linux runs Go on.
const UserHZ = 100

// CPUTime reads how much CPU pid has used, user and system, in seconds,
// from /proc/<pid>/stat. A process that is gone is an error wrapping
// fs.ErrNotExist.
func (s *Sampler) CPUTime(pid int) (float64, error) {
	path := "/proc/" + strconv.Itoa(pid) + "/stat"
	b, err := s.read(path)
	if err != nil {
		return 0, err
	}
	ticks, err := ParseStatCPU(b)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return float64(ticks) / UserHZ, nil
}

// ParseStatCPU returns utime + stime, in ticks, of a /proc/<pid>/stat
// line. The command name (field 2) is in parentheses and may hold spaces
// and parentheses itself, so the fields are counted from its last ')'.
func ParseStatCPU(b []byte) (uint64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("no ')' after the command name")
	}
	f := strings.Fields(string(b[i+1:]))
	// After the name: state (field 3), ppid (4), ..., utime (14), stime (15).
	if len(f) < 13 {
		return 0, fmt.Errorf("%d fields after the command name, want at least 13", len(f))
	}
	var total uint64
	for _, v := range f[11:13] {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("CPU time %q: %w", v, err)
		}
		total += n
	}
	return total, nil
}

// read reads a whole /proc file into s.buf. /proc files report size 0, so
// the buffer grows until a read returns nothing more. Plain system calls,
// not os.File: the master reads a few files per worker every second, and
// os.Open adds an fstat and a poller registration to each.
func (s *Sampler) read(path string) ([]byte, error) {
	fd, err := retryEINTR(func() (int, error) { return syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0) })
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	defer syscall.Close(fd)
	if s.buf == nil {
		s.buf = make([]byte, 4096)
	}
	n := 0
	for {
		if n == len(s.buf) {
			s.buf = append(s.buf, make([]byte, len(s.buf))...)
		}
		k, err := retryEINTR(func() (int, error) { return syscall.Read(fd, s.buf[n:]) })
		if err != nil {
			return nil, &fs.PathError{Op: "read", Path: path, Err: err}
		}
		if k == 0 {
			return s.buf[:n], nil
		}
		n += k
	}
}

func retryEINTR(f func() (int, error)) (int, error) {
	for {
		n, err := f()
		if err != syscall.EINTR {
			return n, err
		}
	}
}

// parseStatusRSS finds VmRSS in status text. A kernel thread or a zombie
// has no VmRSS line: that is 0, not an error.
func parseStatusRSS(b []byte) (uint64, error) {
	v, _, err := kBField(b, "VmRSS")
	return v, err
}

// ParseSmapsRollup returns the Pss of /proc/<pid>/smaps_rollup text, in
// bytes.
func ParseSmapsRollup(b []byte) (uint64, error) {
	v, ok, err := kBField(b, "Pss")
	if err == nil && !ok {
		err = errors.New("no Pss line")
	}
	return v, err
}

// kBField finds the line "key: <n> kB" and returns n in bytes; ok is false
// if there is no such line.
func kBField(b []byte, key string) (v uint64, ok bool, err error) {
	for len(b) > 0 {
		var line []byte
		line, b, _ = bytes.Cut(b, []byte{'\n'})
		k, val, found := bytes.Cut(line, []byte{':'})
		if !found || string(k) != key {
			continue
		}
		v, err := parseKB(key, val)
		return v, true, err
	}
	return 0, false, nil
}

// parseKB parses the value of a "key: <n> kB" line, in bytes.
func parseKB(key string, val []byte) (uint64, error) {
	num, unit, _ := bytes.Cut(bytes.TrimSpace(val), []byte{' '})
	v, err := strconv.ParseUint(string(num), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse %s %q: %w", key, val, err)
	}
	switch u := string(bytes.TrimSpace(unit)); u {
	case "kB":
		return v * 1024, nil
	case "":
		return v, nil
	default:
		return 0, fmt.Errorf("parse %s %q: unknown unit %q", key, val, u)
	}
}

// MemoryLimit returns the memory the calling process can use: the
// machine's MemTotal, or the lowest cgroup v2 memory.max on the path from
// its cgroup to the root, if lower.
func MemoryLimit() (uint64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	limit, ok, err := kBField(b, "MemTotal")
	if err != nil || !ok {
		return 0, fmt.Errorf("/proc/meminfo: no MemTotal (%v)", err)
	}
	b, err = os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return limit, nil // no cgroups: the machine's memory it is
	}
	return min(limit, CgroupMemoryMax("/sys/fs/cgroup", b)), nil
}

// CgroupMemoryMax returns the lowest memory.max under root on the path of
// the unified (v2) hierarchy named in /proc/self/cgroup text, or the
// largest uint64 when there is none: a parent's limit binds its children.
func CgroupMemoryMax(root string, cgroup []byte) uint64 {
	limit := uint64(math.MaxUint64)
	for _, line := range strings.Split(string(cgroup), "\n") {
		path, ok := strings.CutPrefix(line, "0::")
		if !ok {
			continue
		}
		for dir := filepath.Join(root, path); strings.HasPrefix(dir, root); dir = filepath.Dir(dir) {
			b, err := os.ReadFile(filepath.Join(dir, "memory.max"))
			if err == nil {
				if v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil { // "max" is no limit
					limit = min(limit, v)
				}
			}
			if dir == root {
				break
			}
		}
	}
	return limit
}

// ConntrackDir holds the conntrack table's sysctls. /proc/sys/net shows
// the network namespace of the thread that opens it, so a reader sees its
// own namespace's table.
const ConntrackDir = "/proc/sys/net/netfilter"

// Conntrack reads the conntrack table's entry count and its limit
// (nf_conntrack_count and nf_conntrack_max) under dir, ConntrackDir but
// for tests. Without the nf_conntrack module loaded the files do not
// exist, and the error wraps fs.ErrNotExist.
func Conntrack(dir string) (count, limit uint64, err error) {
	read := func(name string) (uint64, error) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return 0, err
		}
		v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse %s: %w", filepath.Join(dir, name), err)
		}
		return v, nil
	}
	if count, err = read("nf_conntrack_count"); err != nil {
		return 0, 0, err
	}
	if limit, err = read("nf_conntrack_max"); err != nil {
		return 0, 0, err
	}
	return count, limit, nil
}

// Bound is a socket's local address in one of /proc/net's tables.
type Bound struct {
	Addr netip.Addr // unspecified for a wildcard bind
	Port uint16
}

// BoundSockets returns the local addresses of the sockets in one of
// /proc/net's tables (as BoundPorts) that are in state.
func BoundSockets(table, state string) ([]Bound, error) {
	b, err := os.ReadFile("/proc/net/" + table)
	if err != nil {
		return nil, fmt.Errorf("read /proc/net/%s: %w", table, err)
	}
	return ParseBoundSockets(b, state), nil
}

// ParseBoundSockets is BoundSockets on a table's text. The kernel prints
// an address as 32-bit words in host (here little-endian) order.
func ParseBoundSockets(b []byte, state string) []Bound {
	var out []Bound
	lines := bytes.Split(b, []byte("\n"))
	for _, line := range lines[min(1, len(lines)):] {
		f := bytes.Fields(line)
		if len(f) < 4 || string(f[3]) != state {
			continue
		}
		addr, port, ok := bytes.Cut(f[1], []byte(":"))
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(string(port), 16, 16)
		if err != nil {
			continue
		}
		raw, err := hex.DecodeString(string(addr))
		if err != nil || len(raw) != 4 && len(raw) != 16 {
			continue
		}
		for i := 0; i < len(raw); i += 4 { // each word back to network order
			raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
		}
		a, _ := netip.AddrFromSlice(raw)
		out = append(out, Bound{Addr: a, Port: uint16(n)})
	}
	return out
}

// BoundPorts returns the local ports of the sockets in one of /proc/net's
// tables (tcp, tcp6, udp, udp6, of the reader's network namespace) that
// are in state, a hex state of those tables: "0A" for a listening TCP
// socket, "07" for a bound, unconnected UDP one.
func BoundPorts(table, state string) (map[uint16]bool, error) {
	b, err := os.ReadFile("/proc/net/" + table)
	if err != nil {
		return nil, fmt.Errorf("read /proc/net/%s: %w", table, err)
	}
	return ParseBoundPorts(b, state), nil
}

// ParseBoundPorts is BoundPorts on a table's text (see ParseBoundSockets).
func ParseBoundPorts(b []byte, state string) map[uint16]bool {
	out := map[uint16]bool{}
	for _, s := range ParseBoundSockets(b, state) {
		out[s.Port] = true
	}
	return out
}

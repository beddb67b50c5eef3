package procfs

import (
	"errors"
	"io/fs"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseStatus(t *testing.T) {
	s, err := ParseStatus([]byte("Name:\tx\nThreads:\t7\nVmRSS:\t  2048 kB\nCapEff:\t0000000000001000\n"))
	if err != nil {
		t.Fatal(err)
	}
	if s.RSSBytes != 2048*1024 || s.Threads != 7 || !s.HasCap(CapNetAdmin) || s.HasCap(0) {
		t.Errorf("parsed %+v", s)
	}
	s, err = ParseStatus([]byte("Uid:\t0\t65534\t65534\t65534\nGid:\t1\t2\t3\t4\nCapInh:\t0000000000000020\nCapPrm:\t00000000000000c0\nCapEff:\t0000000000000000\nCapAmb:\t0000000000001000\nNoNewPrivs:\t1\n"))
	if err != nil {
		t.Fatal(err)
	}
	if s.UID != [4]int{0, 65534, 65534, 65534} || s.GID != [4]int{1, 2, 3, 4} || s.CapPrm != 0xc0 || s.CapEff != 0 || s.CapAmb != 1<<CapNetAdmin ||
		s.CapInh != 1<<CapKill || !s.NoNewPrivs {
		t.Errorf("parsed %+v", s)
	}
	if _, err := ParseStatus([]byte("Name:\tx\n")); err == nil {
		t.Error("status without CapEff accepted")
	}
	if _, err := ParseStatus([]byte("CapEff:\tzz\n")); err == nil {
		t.Error("bad CapEff accepted")
	}
}

func TestReadStatusSelf(t *testing.T) {
	s, err := ReadStatus(0)
	if err != nil {
		t.Fatal(err)
	}
	if s.RSSBytes == 0 || s.Threads == 0 {
		t.Errorf("own status: %+v", s)
	}
	if _, err := ReadStatus(os.Getpid()); err != nil {
		t.Error(err)
	}
}

// smapsRollup is /proc/<pid>/smaps_rollup of a Linux 6.x process.
const smapsRollup = `55d0c8a4a000-7ffd6b5f4000 ---p 00000000 00:00 0                          [rollup]
Rss:               10932 kB
Pss:                6481 kB
Pss_Dirty:          4780 kB
Pss_Anon:           4772 kB
Pss_File:           1709 kB
Pss_Shmem:             0 kB
Shared_Clean:       5648 kB
Shared_Dirty:          0 kB
Private_Clean:       504 kB
Private_Dirty:      4780 kB
Referenced:        10932 kB
Anonymous:          4772 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
`

func TestParseSmapsRollup(t *testing.T) {
	pss, err := ParseSmapsRollup([]byte(smapsRollup))
	if err != nil {
		t.Fatal(err)
	}
	// Pss, not Pss_Dirty or Rss: the key must match the whole name.
	if pss != 6481*1024 {
		t.Errorf("Pss = %d, want %d", pss, 6481*1024)
	}
	for _, bad := range []string{"Rss: 1 kB\n", "Pss: x kB\n", "Pss: 12 MB\n", ""} {
		if v, err := ParseSmapsRollup([]byte(bad)); err == nil {
			t.Errorf("ParseSmapsRollup(%q) = %d, want an error", bad, v)
		}
	}
}

func TestParseStatusRSS(t *testing.T) {
	for _, tc := range []struct {
		text string
		want uint64
		ok   bool
	}{
		{"Name:\tx\nVmPeak:\t 9 kB\nVmRSS:\t  2048 kB\n", 2048 * 1024, true},
		{"Name:\tkthreadd\nThreads:\t1\n", 0, true}, // kernel threads have no VmRSS
		{"VmRSS:\tlots kB\n", 0, false},
	} {
		got, err := parseStatusRSS([]byte(tc.text))
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseStatusRSS(%q) = %d, %v; want %d, ok=%v", tc.text, got, err, tc.want, tc.ok)
		}
	}
}

func TestSamplerMemorySelf(t *testing.T) {
	var s Sampler
	s.buf = make([]byte, 16) // force the buffer to grow
	m, err := s.Memory(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if m.RSSBytes == 0 {
		t.Errorf("own RSS is 0: %+v", m)
	}
	if _, err := os.Stat("/proc/self/smaps_rollup"); err == nil && (m.PSSBytes == 0 || m.PSSBytes > 2*m.RSSBytes) {
		// (VmRSS comes from counters the kernel batches per thread, so
		// PSS may exceed it a little, never by far.)
		t.Errorf("own PSS %d is 0 or far above RSS %d", m.PSSBytes, m.RSSBytes)
	}
	if _, err := s.Memory(1 << 30); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Memory of a missing pid: %v, want fs.ErrNotExist", err)
	}
}

// BenchmarkSamplerMemory is what the master pays per worker per monitor
// interval.
func BenchmarkSamplerMemory(b *testing.B) {
	var s Sampler
	pid := os.Getpid()
	for b.Loop() {
		if _, err := s.Memory(pid); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSamplerRSS is what the master's loop pays per worker per
// monitor interval.
func BenchmarkSamplerRSS(b *testing.B) {
	var s Sampler
	pid := os.Getpid()
	for b.Loop() {
		if _, err := s.RSS(pid); err != nil {
			b.Fatal(err)
		}
	}
}

// The lowest memory.max on the path from the process's cgroup to the root
// binds; "max" is no limit; v1 lines are ignored.
func TestCgroupMemoryMax(t *testing.T) {
	root := t.TempDir()
	write := func(dir, v string) {
		if err := os.MkdirAll(filepath.Join(root, dir), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, dir, "memory.max"), []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("system.slice", "1073741824")
	write("system.slice/app.service", "max")
	cg := []byte("12:memory:/ignored\n0::/system.slice/app.service\n")
	if got := CgroupMemoryMax(root, cg); got != 1<<30 {
		t.Errorf("got %d, want the parent's 1 GiB", got)
	}
	write("system.slice/app.service", "536870912")
	if got := CgroupMemoryMax(root, cg); got != 512<<20 {
		t.Errorf("got %d, want the service's 512 MiB", got)
	}
	if got := CgroupMemoryMax(root, []byte("0::/\n")); got != math.MaxUint64 {
		t.Errorf("no limit: got %d", got)
	}
	if lim, err := MemoryLimit(); err != nil || lim == 0 {
		t.Errorf("MemoryLimit() = %d, %v", lim, err)
	}
}

func TestConntrack(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := Conntrack(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("without the module: %v, want fs.ErrNotExist", err)
	}
	for name, v := range map[string]string{"nf_conntrack_count": "1234\n", "nf_conntrack_max": "262144\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if n, lim, err := Conntrack(dir); err != nil || n != 1234 || lim != 262144 {
		t.Errorf("Conntrack = %d, %d, %v; want 1234, 262144", n, lim, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "nf_conntrack_max"), []byte("lots\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Conntrack(dir); err == nil || !strings.Contains(err.Error(), "nf_conntrack_max") {
		t.Errorf("a bad file: %v, want an error naming it", err)
	}
	// This machine's own table, as the master reads it.
	if n, lim, err := Conntrack(ConntrackDir); err == nil && (lim == 0 || n > lim) {
		t.Errorf("%s: count %d, max %d", ConntrackDir, n, lim)
	} else {
		t.Logf("%s: count %d, max %d, %v", ConntrackDir, n, lim, err)
	}
}

func TestParseBoundPorts(t *testing.T) {
	table := []byte(`  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 010012C6:9C40 010112C6:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: 00000000000000000000000000000000:A000 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0
`)
	got := ParseBoundPorts(table, "0A")
	if len(got) != 2 || !got[8080] || !got[40960] {
		t.Errorf("listening ports %v, want 8080 and 40960 (not the established 40000)", got)
	}
}

func TestParseBoundSockets(t *testing.T) {
	table := []byte(`  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 010012C6:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:A000 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0
   2: 000000FD000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0
`)
	got := ParseBoundSockets(table, "0A")
	want := []Bound{{netip.MustParseAddr("198.18.0.1"), 8080}, {netip.MustParseAddr("::1"), 40960}, {netip.MustParseAddr("fd00::1"), 8080}}
	if !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

func TestParseStatCPU(t *testing.T) {
	// A command name with spaces and a ')' in it; utime 1234, stime 56.
	line := []byte("4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 56 0 0 20 0 1 0 12345 1000 10 18446744073709551615\n")
	if n, err := ParseStatCPU(line); err != nil || n != 1290 {
		t.Fatalf("ParseStatCPU = %d, %v; want 1290", n, err)
	}
	if _, err := ParseStatCPU([]byte("4242 (x) S 1 2")); err == nil {
		t.Error("a short line parsed")
	}
	var s Sampler
	before, err := s.CPUTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(200 * time.Millisecond); time.Now().Before(deadline); {
	}
	after, err := s.CPUTime(os.Getpid())
	if err != nil || after <= before {
		t.Errorf("CPU time %g then %g after a busy loop (%v)", before, after, err)
	}
}

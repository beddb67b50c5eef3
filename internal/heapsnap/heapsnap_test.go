package heapsnap_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/ipcluster/ipcluster/internal/heapsnap"
)

const (
	chunk     = 8 << 10 // an exact size class, so in-use bytes are exact
	steadyMiB = 16
	leakMiB   = 8
	mib       = 1 << 20
)

// steadyCache holds memory from before the start to after the end: the
// largest in-use site in either profile alone, and nothing in their diff.
//
//go:noinline
func steadyCache(n int) [][]byte {
	c := make([][]byte, n)
	for i := range c {
		c[i] = make([]byte, chunk)
	}
	return c
}

// leakyCache is the leak: it allocates between the two profiles and keeps
// what it allocated.
//
//go:noinline
func leakyCache(n int) [][]byte {
	c := make([][]byte, n)
	for i := range c {
		c[i] = make([]byte, chunk)
	}
	return c
}

// heapProfile returns the heap profile as /debug/pprof/heap serves it, as
// of a garbage collection run now.
func heapProfile(t *testing.T) []byte {
	t.Helper()
	runtime.GC()
	var buf bytes.Buffer
	if err := pprof.Lookup("heap").WriteTo(&buf, 0); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// leakProfiles takes a heap profile, leaks leakMiB through leakyCache and
// takes another (end), and then another with no leak between (again), with
// steadyMiB held by steadyCache throughout.
func leakProfiles(t *testing.T) (start, end, again []byte) {
	t.Helper()
	// Record every allocation, so the figures are exact rather than
	// sampled; restored before the test ends.
	rate := runtime.MemProfileRate
	runtime.MemProfileRate = 1
	defer func() { runtime.MemProfileRate = rate }()

	steady := steadyCache(steadyMiB * mib / chunk)
	start = heapProfile(t)
	leak := leakyCache(leakMiB * mib / chunk)
	end = heapProfile(t)
	again = heapProfile(t)
	runtime.KeepAlive(steady)
	runtime.KeepAlive(leak)
	return start, end, again
}

func top(t *testing.T, prof []byte) []heapsnap.Entry {
	t.Helper()
	e, err := heapsnap.Top(prof, "inuse_space", 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(e) == 0 {
		t.Fatal("Top returned no entries")
	}
	return e
}

func flatOf(entries []heapsnap.Entry, fn string) int64 {
	var v int64
	for _, e := range entries {
		if strings.HasSuffix(e.Func, "."+fn) {
			v += e.Flat
		}
	}
	return v
}

// The leak scenario: the diff's top entry is the leaking function, though
// neither profile alone has it on top, and the diff the other way round
// shows it shrinking.
func TestDiffFindsLeak(t *testing.T) {
	start, end, again := leakProfiles(t)

	// Alone, the end profile's top site is the steady one: the diff, not
	// the end, is what finds the leak.
	if e := top(t, end); !strings.HasSuffix(e[0].Func, ".steadyCache") {
		t.Fatalf("top of the end profile is %s, want steadyCache (the test's premise)", e[0].Func)
	}

	d, err := heapsnap.Diff(start, end)
	if err != nil {
		t.Fatal(err)
	}
	e := top(t, d)
	if !strings.Contains(e[0].Func, "leakyCache") {
		t.Fatalf("top of the diff is %s (%d bytes), want leakyCache; all: %v", e[0].Func, e[0].Flat, e[:min(5, len(e))])
	}
	if e[0].Flat < leakMiB*mib {
		t.Errorf("leakyCache grew by %d bytes in the diff, want at least %d", e[0].Flat, leakMiB*mib)
	}
	if v := flatOf(e, "steadyCache"); v > mib || v < -mib {
		t.Errorf("steadyCache's in-use bytes changed by %d in the diff, want about 0", v)
	}
	one, err := heapsnap.Top(d, "inuse_space", 1)
	if err != nil || len(one) != 1 || one[0] != e[0] {
		t.Errorf("Top(diff, 1) = %v, %v; want [%v]", one, err, e[0])
	}

	// Swapped, the leak is the largest shrink, and not the top.
	r, err := heapsnap.Diff(end, start)
	if err != nil {
		t.Fatal(err)
	}
	re := top(t, r)
	if strings.Contains(re[0].Func, "leakyCache") {
		t.Errorf("top of the reversed diff is %s, want anything but leakyCache", re[0].Func)
	}
	if v := flatOf(re, "leakyCache"); v > -leakMiB*mib {
		t.Errorf("leakyCache changed by %d bytes in the reversed diff, want at most %d", v, -leakMiB*mib)
	}

	// Without a leak between them, two profiles' diff has no leakyCache.
	n, err := heapsnap.Diff(end, again)
	if err != nil {
		t.Fatal(err)
	}
	if ne, err := heapsnap.Top(n, "inuse_space", 0); err != nil {
		t.Fatal(err)
	} else if v := flatOf(ne, "leakyCache"); v > mib || v < -mib {
		t.Errorf("leakyCache changed by %d bytes between two profiles with no leak between them", v)
	}
}

// The Store writes the start, the end and their diff, and the diff file is
// what pprof itself reads and reports: the same report as -diff_base.
func TestStoreLeakPprof(t *testing.T) {
	start, end, _ := leakProfiles(t)
	dir := filepath.Join(t.TempDir(), "snap")
	s, err := heapsnap.Open(dir, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("Open made %s: %v, %v; want a directory of mode 0700", dir, fi, err)
	}
	const name = "web-slot3-pid1234-gen2"
	sp, err := s.WriteStart(name, start)
	if err != nil {
		t.Fatal(err)
	}
	ep, dp, err := s.WriteEnd(name, end)
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{sp: "-start.pb.gz", ep: "-end.pb.gz", dp: "-diff.pb.gz"} {
		if path != filepath.Join(dir, name+want) {
			t.Errorf("wrote %s, want %s", path, filepath.Join(dir, name+want))
		}
	}
	d, err := os.ReadFile(dp)
	if err != nil {
		t.Fatal(err)
	}
	if e := top(t, d); !strings.Contains(e[0].Func, "leakyCache") {
		t.Fatalf("top of %s is %s, want leakyCache", dp, e[0].Func)
	}
	if got, _ := os.ReadFile(sp); !bytes.Equal(got, start) {
		t.Errorf("%s differs from the profile given", sp)
	}
	t.Logf("sizes: start %d, end %d, diff %d bytes", fileSize(t, sp), fileSize(t, ep), fileSize(t, dp))
	if names := listDir(t, dir); len(names) != 3 {
		t.Errorf("dir holds %v, want the three files and nothing else (no temporary files)", names)
	}

	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go on PATH to run go tool pprof")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	pprofTop := func(args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, goTool, append([]string{"tool", "pprof", "-top", "-sample_index=inuse_space"}, args...)...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("go tool pprof %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	diffOut := pprofTop(filepath.Base(dp))
	t.Logf("go tool pprof -top -sample_index=inuse_space %s:\n%s", filepath.Base(dp), firstLines(diffOut, 12))
	if row := firstRow(diffOut); !strings.Contains(row, "leakyCache") {
		t.Errorf("first row of pprof -top of the diff is %q, want leakyCache\n%s", row, diffOut)
	}
	baseOut := pprofTop("-diff_base", filepath.Base(sp), filepath.Base(ep))
	t.Logf("go tool pprof -top -sample_index=inuse_space -diff_base %s %s:\n%s", filepath.Base(sp), filepath.Base(ep), firstLines(baseOut, 12))
	if a, b := fromShowing(diffOut), fromShowing(baseOut); a != b {
		t.Errorf("pprof -top of the diff differs from pprof -top -diff_base start end:\n%s\n---\n%s", a, b)
	}
}

// firstRow returns the first line after pprof -top's column header.
func firstRow(out string) string {
	lines := strings.Split(out, "\n")
	for i, l := range lines {
		if strings.Contains(l, "flat%") && i+1 < len(lines) {
			return lines[i+1]
		}
	}
	return ""
}

// fromShowing returns the report from its "Showing nodes" line on, after
// the header lines that name the files.
func fromShowing(out string) string {
	if i := strings.Index(out, "Showing nodes"); i >= 0 {
		return out[i:]
	}
	return out
}

func firstLines(s string, n int) string {
	l := strings.SplitN(s, "\n", n+1)
	return strings.Join(l[:min(n, len(l))], "\n")
}

func listDir(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

// synth returns a small heap-like profile with one sample per function.
func synth(t *testing.T, values map[string]int64) []byte {
	t.Helper()
	p := &profile.Profile{
		SampleType: []*profile.ValueType{
			{Type: "inuse_objects", Unit: "count"},
			{Type: "inuse_space", Unit: "bytes"},
		},
		PeriodType: &profile.ValueType{Type: "space", Unit: "bytes"},
		Period:     1,
	}
	fns := make([]string, 0, len(values))
	for fn := range values {
		fns = append(fns, fn)
	}
	slices.Sort(fns)
	for i, fn := range fns {
		f := &profile.Function{ID: uint64(i + 1), Name: fn, SystemName: fn}
		l := &profile.Location{ID: uint64(i + 1), Line: []profile.Line{{Function: f}}}
		p.Function = append(p.Function, f)
		p.Location = append(p.Location, l)
		p.Sample = append(p.Sample, &profile.Sample{Location: []*profile.Location{l}, Value: []int64{1, values[fn]}})
	}
	var buf bytes.Buffer
	if err := p.Write(&buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestTop(t *testing.T) {
	base := synth(t, map[string]int64{"main.a": 100, "main.b": 50, "main.gone": 70})
	prof := synth(t, map[string]int64{"main.a": 100, "main.b": 300, "main.c": 10, "main.d": 10})
	d, err := heapsnap.Diff(base, prof)
	if err != nil {
		t.Fatal(err)
	}
	got, err := heapsnap.Top(d, "inuse_space", 0)
	if err != nil {
		t.Fatal(err)
	}
	want := []heapsnap.Entry{{"main.b", 250}, {"main.c", 10}, {"main.d", 10}, {"main.gone", -70}}
	if !slices.Equal(got, want) {
		t.Errorf("Top(diff) = %v, want %v (main.a unchanged, left out)", got, want)
	}
	if got, _ := heapsnap.Top(d, "inuse_space", 2); !slices.Equal(got, want[:2]) {
		t.Errorf("Top(diff, 2) = %v, want %v", got, want[:2])
	}
	if got, _ := heapsnap.Top(d, "", 1); !slices.Equal(got, want[:1]) {
		t.Errorf("Top(diff, \"\" (the last type, inuse_space), 1) = %v, want %v", got, want[:1])
	}
	if got, _ := heapsnap.Top(d, "inuse_objects", 1); len(got) != 1 || got[0].Func != "main.c" {
		t.Errorf("Top(diff, inuse_objects, 1) = %v, want main.c first (+1 object, sorted by name among equals)", got)
	}
	if _, err := heapsnap.Top(d, "alloc_space", 1); err == nil || !strings.Contains(err.Error(), `no sample type "alloc_space"`) || !strings.Contains(err.Error(), "inuse_space") {
		t.Errorf("Top with a missing sample type: %v, want an error naming it and the types there are", err)
	}
}

// setSize is the total size of the files one set of synthetic profiles
// takes.
func setSize(t *testing.T, start, end []byte) (set, startOnly int64) {
	t.Helper()
	s, err := heapsnap.Open(t.TempDir(), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	sp, err := s.WriteStart("probe", start)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.WriteEnd("probe", end); err != nil {
		t.Fatal(err)
	}
	return dirSize(t, s.Dir()), fileSize(t, sp)
}

func dirSize(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	for _, name := range listDir(t, dir) {
		n += fileSize(t, filepath.Join(dir, name))
	}
	return n
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

func writeSet(t *testing.T, s *heapsnap.Store, name string, start, end []byte, startTime time.Time) {
	t.Helper()
	sp, err := s.WriteStart(name, start)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(sp, startTime, startTime); err != nil {
		t.Fatal(err)
	}
	if end == nil {
		return
	}
	if _, dp, err := s.WriteEnd(name, end); err != nil || dp == "" {
		t.Fatalf("WriteEnd %s: diff %q, %v", name, dp, err)
	}
}

func exists(dir, file string) bool {
	_, err := os.Stat(filepath.Join(dir, file))
	return err == nil
}

// Over the cap, the oldest complete set goes, by its start's time (not its
// name or its end's), and the rest stays: newer sets, a start still waiting
// for its end, and files the Store did not write.
func TestRotate(t *testing.T) {
	start := synth(t, map[string]int64{"main.a": 100})
	end := synth(t, map[string]int64{"main.a": 300})
	set, startOnly := setSize(t, start, end)

	dir := t.TempDir()
	// Room for two sets and a start, not three sets.
	s, err := heapsnap.Open(dir, 2*set+startOnly+set/4)
	if err != nil {
		t.Fatal(err)
	}
	foreign := map[string][]byte{
		"notes.txt":              bytes.Repeat([]byte("x"), int(10*set)),
		"other.pb.gz":            start,
		"zz-old-start.pb.gz.bak": start,
		".hidden-start.pb.gz":    start,
		"-dash-end.pb.gz":        end,
	}
	for name, data := range foreign {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	writeSet(t, s, "running", start, nil, now.Add(-5*time.Hour))
	writeSet(t, s, "zz-old", start, end, now.Add(-3*time.Hour))
	// aa-mid's end is older than zz-old's, its start newer: the start
	// decides.
	writeSet(t, s, "aa-mid", start, end, now.Add(-2*time.Hour))
	if err := os.Chtimes(filepath.Join(dir, "aa-mid-end.pb.gz"), now.Add(-4*time.Hour), now.Add(-4*time.Hour)); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"zz-old-start.pb.gz", "aa-mid-diff.pb.gz"} {
		if !exists(dir, f) {
			t.Fatalf("%s gone before the directory was over its cap", f)
		}
	}
	writeSet(t, s, "new", start, end, now.Add(-1*time.Hour))

	for _, suf := range []string{"-start.pb.gz", "-end.pb.gz", "-diff.pb.gz"} {
		if exists(dir, "zz-old"+suf) {
			t.Errorf("zz-old%s kept, want the oldest set deleted", suf)
		}
		for _, kept := range []string{"aa-mid", "new"} {
			if !exists(dir, kept+suf) {
				t.Errorf("%s%s deleted, want it kept", kept, suf)
			}
		}
	}
	if !exists(dir, "running-start.pb.gz") {
		t.Error("the start without an end was deleted, want it kept: its worker may still be running")
	}
	for name, data := range foreign {
		if got, err := os.ReadFile(filepath.Join(dir, name)); err != nil || !bytes.Equal(got, data) {
			t.Errorf("foreign file %s changed or gone: %v", name, err)
		}
	}
}

// The set just written stays even when it alone is over the cap.
func TestRotateKeepsNewest(t *testing.T) {
	start := synth(t, map[string]int64{"main.a": 100})
	end := synth(t, map[string]int64{"main.a": 300})
	dir := t.TempDir()
	s, err := heapsnap.Open(dir, 1)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	writeSet(t, s, "first", start, end, now.Add(-time.Hour))
	writeSet(t, s, "second", start, end, now)
	if got, want := listDir(t, dir), []string{"second-diff.pb.gz", "second-end.pb.gz", "second-start.pb.gz"}; !slices.Equal(got, want) {
		t.Errorf("dir holds %v, want %v", got, want)
	}
}

// An end without a start is written without a diff, and is a complete set
// rotation may delete, ordered by its end's time.
func TestMissingStart(t *testing.T) {
	end := synth(t, map[string]int64{"main.a": 300})
	dir := t.TempDir()
	s, err := heapsnap.Open(dir, 1)
	if err != nil {
		t.Fatal(err)
	}
	ep, dp, err := s.WriteEnd("killed-early", end)
	if err != nil || dp != "" {
		t.Fatalf("WriteEnd without a start: diff %q, %v; want no diff and no error", dp, err)
	}
	if got, _ := os.ReadFile(ep); !bytes.Equal(got, end) {
		t.Errorf("%s differs from the profile given", ep)
	}
	if exists(dir, "killed-early-diff.pb.gz") {
		t.Error("a diff was written without a start")
	}
	if _, _, err := s.WriteEnd("next", end); err != nil {
		t.Fatal(err)
	}
	if got, want := listDir(t, dir), []string{"next-end.pb.gz"}; !slices.Equal(got, want) {
		t.Errorf("dir holds %v, want %v", got, want)
	}
}

func TestNames(t *testing.T) {
	prof := synth(t, map[string]int64{"main.a": 1})
	dir := t.TempDir()
	s, err := heapsnap.Open(dir, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"", "a/b", "../x", "..", ".", ".hidden", "-x", "a b", "a\x00b", `a\b`, "ünï", "a\nb", strings.Repeat("a", 129)} {
		if _, err := s.WriteStart(name, prof); err == nil || !strings.Contains(err.Error(), "snapshot name") {
			t.Errorf("WriteStart(%q): %v, want an error about the name", name, err)
		}
		if _, _, err := s.WriteEnd(name, prof); err == nil || !strings.Contains(err.Error(), "snapshot name") {
			t.Errorf("WriteEnd(%q): %v, want an error about the name", name, err)
		}
	}
	if names := listDir(t, dir); len(names) != 0 {
		t.Errorf("bad names wrote %v", names)
	}
	if entries, _ := os.ReadDir(filepath.Dir(dir)); len(entries) != 1 {
		t.Errorf("bad names wrote beside the directory: %v", entries)
	}
	for _, name := range []string{"web-slot3-pid1234-gen2", "A.b_c-1", strings.Repeat("a", 128)} {
		if _, err := s.WriteStart(name, prof); err != nil {
			t.Errorf("WriteStart(%q): %v", name, err)
		}
	}
}

func TestCorrupt(t *testing.T) {
	good := synth(t, map[string]int64{"main.a": 1})
	dir := t.TempDir()
	s, err := heapsnap.Open(dir, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		data []byte
		want string
	}{
		{nil, "empty profile"},
		{[]byte("not a profile at all"), "parsing profile"},
		{[]byte{0x1f, 0x8b, 8, 0, 1, 2, 3}, "decompressing profile"},
		{good[:len(good)/2], "decompressing profile"},
	} {
		if _, err := s.WriteStart("w", c.data); err == nil || !strings.Contains(err.Error(), "start w: start profile: ") || !strings.Contains(err.Error(), c.want) {
			t.Errorf("WriteStart(%q): %v, want an error naming the start profile and %q", c.data, err, c.want)
		}
		if _, _, err := s.WriteEnd("w", c.data); err == nil || !strings.Contains(err.Error(), "end w: end profile: ") || !strings.Contains(err.Error(), c.want) {
			t.Errorf("WriteEnd(%q): %v, want an error naming the end profile and %q", c.data, err, c.want)
		}
		if _, err := heapsnap.Diff(c.data, good); err == nil || !strings.Contains(err.Error(), "base profile: ") {
			t.Errorf("Diff(%q, good): %v, want an error naming the base", c.data, err)
		}
		if _, err := heapsnap.Diff(good, c.data); err == nil || !strings.Contains(err.Error(), "heap profiles: profile: ") {
			t.Errorf("Diff(good, %q): %v, want an error naming the profile", c.data, err)
		}
		if _, err := heapsnap.Top(c.data, "inuse_space", 1); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Top(%q): %v, want %q", c.data, err, c.want)
		}
	}
	if names := listDir(t, dir); len(names) != 0 {
		t.Errorf("corrupt profiles wrote %v", names)
	}

	// A start that went bad on disk: the end is written, the error names
	// the start's file.
	startPath := filepath.Join(dir, "w-start.pb.gz")
	if err := os.WriteFile(startPath, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	ep, dp, err := s.WriteEnd("w", good)
	if err == nil || !strings.Contains(err.Error(), startPath) || ep == "" || dp != "" {
		t.Errorf("WriteEnd over a corrupt start: end %q, diff %q, %v; want the end written, no diff, an error naming %s", ep, dp, err, startPath)
	}

	// Profiles of different kinds do not subtract.
	cpu := &profile.Profile{
		SampleType: []*profile.ValueType{{Type: "samples", Unit: "count"}, {Type: "cpu", Unit: "nanoseconds"}},
		PeriodType: &profile.ValueType{Type: "cpu", Unit: "nanoseconds"},
	}
	var buf bytes.Buffer
	if err := cpu.Write(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := heapsnap.Diff(buf.Bytes(), good); err == nil || !strings.Contains(err.Error(), "subtract the base") {
		t.Errorf("Diff(cpu, heap): %v, want an error about subtracting", err)
	}
}

func TestOpen(t *testing.T) {
	if _, err := heapsnap.Open("", 1); err == nil || !strings.Contains(err.Error(), "no directory given") {
		t.Errorf("Open(\"\"): %v", err)
	}
	if _, err := heapsnap.Open(t.TempDir(), 0); err == nil || !strings.Contains(err.Error(), "positive cap") {
		t.Errorf("Open(dir, 0): %v", err)
	}
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := heapsnap.Open(file, 1); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("Open(a file): %v", err)
	}
	if _, err := heapsnap.Open(filepath.Join(file, "sub"), 1); err == nil || !strings.Contains(err.Error(), file) {
		t.Errorf("Open(below a file): %v", err)
	}
	if os.Geteuid() != 0 {
		ro := t.TempDir()
		if err := os.Chmod(ro, 0o500); err != nil {
			t.Fatal(err)
		}
		if _, err := heapsnap.Open(ro, 1); err == nil || !strings.Contains(err.Error(), "cannot create files") {
			t.Errorf("Open(read-only dir): %v", err)
		}
	}
	existing := t.TempDir()
	if err := os.Chmod(existing, 0o750); err != nil {
		t.Fatal(err)
	}
	if _, err := heapsnap.Open(existing, 1); err != nil {
		t.Fatal(err)
	}
	if names := listDir(t, existing); len(names) != 0 {
		t.Errorf("Open left %v behind", names)
	}
}

// Writes from many goroutines, rotating all the while, leave whole sets:
// the newest of each writer at least, and no temporary files.
func TestConcurrent(t *testing.T) {
	start := synth(t, map[string]int64{"main.a": 100})
	end := synth(t, map[string]int64{"main.a": 300})
	set, _ := setSize(t, start, end)
	dir := t.TempDir()
	s, err := heapsnap.Open(dir, 3*set)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for w := range 8 {
		wg.Go(func() {
			for gen := range 5 {
				name := fmt.Sprintf("w%d-gen%d", w, gen)
				if _, err := s.WriteStart(name, start); err != nil {
					errs <- err
					return
				}
				if _, dp, err := s.WriteEnd(name, end); err != nil || dp == "" {
					errs <- fmt.Errorf("WriteEnd %s: diff %q, %w", name, dp, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	names := listDir(t, dir)
	if len(names)%3 != 0 || len(names) == 0 {
		t.Errorf("dir holds %v, want whole sets", names)
	}
	for _, n := range names {
		if strings.HasPrefix(n, ".") {
			t.Errorf("temporary file %s left", n)
		}
	}
	if got := dirSize(t, dir); got > 3*set {
		t.Errorf("dir holds %d bytes, over the cap of %d", got, 3*set)
	}
}

// What is left of a set without its start (an end for a worker killed
// before its warm-up ended, or a diff alone) is complete: rotation deletes
// it, ordered by its end's time, or its own.
func TestRotateWithoutStart(t *testing.T) {
	end := synth(t, map[string]int64{"main.a": 300})
	dir := t.TempDir()
	size := int64(len(end))
	s, err := heapsnap.Open(dir, 2*size+size/2)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for _, c := range []struct {
		name string
		age  time.Duration
	}{{"b-old", 3 * time.Hour}, {"a-new", 2 * time.Hour}} {
		ep, _, err := s.WriteEnd(c.name, end)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(ep, now.Add(-c.age), now.Add(-c.age)); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := s.WriteEnd("latest", end); err != nil {
		t.Fatal(err)
	}
	if got, want := listDir(t, dir), []string{"a-new-end.pb.gz", "latest-end.pb.gz"}; !slices.Equal(got, want) {
		t.Errorf("dir holds %v, want %v (b-old's end is the oldest)", got, want)
	}

	// A diff left alone goes too.
	stray := filepath.Join(dir, "stray-diff.pb.gz")
	if err := os.WriteFile(stray, end, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(stray, now.Add(-4*time.Hour), now.Add(-4*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.WriteEnd("later", end); err != nil {
		t.Fatal(err)
	}
	if got, want := listDir(t, dir), []string{"later-end.pb.gz", "latest-end.pb.gz"}; !slices.Equal(got, want) {
		t.Errorf("dir holds %v, want %v (the stray diff, the oldest, then a-new)", got, want)
	}
}

// Package heapsnap keeps a worker's heap profiles in a directory with a size
// cap: one taken after warm-up (the start), one after the worker has retired
// and drained (the end), and their difference, so that
//
//	go tool pprof -top web-slot3-pid1234-gen2-diff.pb.gz
//
// lists what the worker grew between the two, which is where a leak shows.
// The same report comes from
//
//	go tool pprof -top -diff_base web-slot3-pid1234-gen2-start.pb.gz web-slot3-pid1234-gen2-end.pb.gz
//
// A set is the files of one name: <name>-start.pb.gz, <name>-end.pb.gz and
// <name>-diff.pb.gz. The directory may hold other files; the Store never
// deletes a file whose name it would not have written.
package heapsnap

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
)

// The suffixes of a set's files, after its name.
const (
	startSuffix = "-start.pb.gz"
	endSuffix   = "-end.pb.gz"
	diffSuffix  = "-diff.pb.gz"
)

// maxNameLen bounds a name so that its longest file name stays well under
// the 255 bytes most file systems allow.
const maxNameLen = 128

// A Store writes heap profiles to one directory and keeps the profiles it
// wrote under a size cap. Its methods are safe to call from several
// goroutines: one mutex serialises every write and rotation, so a rotation
// never sees a set half written.
type Store struct {
	dir      string // effectively const
	maxBytes int64  // effectively const

	mu sync.Mutex // held across each WriteStart and WriteEnd
}

// Open returns a Store that writes to dir, creating it (mode 0700: heap
// profiles show the program's code and allocation sites) if it is missing.
// maxBytes caps the total size of the profiles in dir; see WriteEnd for what
// is deleted to keep it. Open checks that dir can be written to, so a bad
// directory is reported now rather than at the first snapshot.
func Open(dir string, maxBytes int64) (*Store, error) {
	if dir == "" {
		return nil, errors.New("open the heap snapshot directory: no directory given: name one the master can write to")
	}
	if maxBytes <= 0 {
		return nil, fmt.Errorf("open the heap snapshot directory %s: size cap %d bytes: give a positive cap (a set of three heap profiles of a small program is a few tens of KiB)", dir, maxBytes)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open the heap snapshot directory %s: %w: create it, or choose a directory the master can write to", dir, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("open the heap snapshot directory %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("open the heap snapshot directory %s: it is not a directory: choose a directory", dir)
	}
	f, err := os.CreateTemp(dir, ".heapsnap-probe-*")
	if err != nil {
		return nil, fmt.Errorf("open the heap snapshot directory %s: cannot create files in it: %w: give the master's user write access, or choose another directory", dir, err)
	}
	name := f.Name()
	f.Close()
	os.Remove(name)
	return &Store{dir: dir, maxBytes: maxBytes}, nil
}

// Dir returns the directory the Store writes to.
func (s *Store) Dir() string { return s.dir }

// WriteStart writes prof, a heap profile as /debug/pprof/heap serves it (a
// gzipped pprof protobuf), to <dir>/<name>-start.pb.gz, replacing a start of
// the same name. The file appears whole or not at all (written to a
// temporary file and renamed). prof is parsed first, so a profile that pprof
// could not read is refused and nothing is written.
//
// name identifies the worker, like "web-slot3-pid1234-gen2": letters,
// digits, '.', '_' and '-', starting with a letter or digit, at most 128
// bytes.
//
// A start without an end belongs to a worker still running, so rotation
// never deletes it; WriteStart rotates too, deleting old complete sets if
// this start takes the directory over the cap.
func (s *Store) WriteStart(name string, prof []byte) (path string, err error) {
	if err := ValidName(name); err != nil {
		return "", fmt.Errorf("write heap snapshot start: %w", err)
	}
	p, err := parse(prof)
	if err != nil {
		return "", fmt.Errorf("write heap snapshot start %s: start profile: %w", name, err)
	}
	data, err := gzipped(prof, p)
	if err != nil {
		return "", fmt.Errorf("write heap snapshot start %s: %w", name, err)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	path = filepath.Join(s.dir, name+startSuffix)
	if err := writeAtomic(path, data); err != nil {
		return "", fmt.Errorf("write heap snapshot start %s: %w", name, err)
	}
	if err := s.rotate(name); err != nil {
		return path, fmt.Errorf("write heap snapshot start %s: %w", name, err)
	}
	return path, nil
}

// WriteEnd writes prof to <dir>/<name>-end.pb.gz and, if the start of name
// exists, their difference (end minus start, see Diff) to
// <dir>/<name>-diff.pb.gz, each atomically. If there is no start, diff is ""
// and that is not an error: a worker killed before its warm-up ended has an
// end only.
//
// Then it rotates: while the profiles in the directory total more than the
// cap, it deletes the oldest complete set (a set with an end, or what is
// left of one without a start; oldest by the modification time of its
// start, or of its end if it has no start), never the set of name. Starts
// without an end are kept (their workers still run) but count against the
// cap, so a directory of nothing but starts may stay over it until their
// ends are written. A file whose name the Store would not have written is
// neither counted nor deleted.
//
// A non-empty path returned with an error names a file that was written:
// a failed diff or rotation leaves the end in place.
func (s *Store) WriteEnd(name string, prof []byte) (end, diff string, err error) {
	if err := ValidName(name); err != nil {
		return "", "", fmt.Errorf("write heap snapshot end: %w", err)
	}
	p, err := parse(prof)
	if err != nil {
		return "", "", fmt.Errorf("write heap snapshot end %s: end profile: %w", name, err)
	}
	data, err := gzipped(prof, p)
	if err != nil {
		return "", "", fmt.Errorf("write heap snapshot end %s: %w", name, err)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	end = filepath.Join(s.dir, name+endSuffix)
	if err := writeAtomic(end, data); err != nil {
		return "", "", fmt.Errorf("write heap snapshot end %s: %w", name, err)
	}
	// An end replacing an earlier one must not sit beside a stale diff.
	diffPath := filepath.Join(s.dir, name+diffSuffix)
	if err := os.Remove(diffPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return end, "", fmt.Errorf("write heap snapshot end %s: remove the old diff: %w", name, err)
	}

	startPath := filepath.Join(s.dir, name+startSuffix)
	start, err := os.ReadFile(startPath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		err = nil // no start: nothing to diff against
	case err != nil:
		err = fmt.Errorf("write heap snapshot diff %s: read the start: %w", name, err)
	default:
		var d []byte
		if d, err = diffParsed(startPath, start, p); err != nil {
			err = fmt.Errorf("write heap snapshot diff %s: %w", name, err)
		} else if err = writeAtomic(diffPath, d); err != nil {
			err = fmt.Errorf("write heap snapshot diff %s: %w", name, err)
		} else {
			diff = diffPath
		}
	}
	if rerr := s.rotate(name); rerr != nil {
		err = errors.Join(err, fmt.Errorf("write heap snapshot end %s: %w", name, rerr))
	}
	return end, diff, err
}

// ValidName reports whether name can name a set: it must be a single file
// name element that cannot be mistaken for a hidden or temporary file.
func ValidName(name string) error {
	const fix = "use letters, digits, '.', '_' and '-', starting with a letter or digit, like \"web-slot3-pid1234-gen2\""
	if name == "" {
		return fmt.Errorf("empty snapshot name: %s", fix)
	}
	if len(name) > maxNameLen {
		return fmt.Errorf("snapshot name %.20q... is %d bytes, more than %d: use a shorter name", name, len(name), maxNameLen)
	}
	if c := name[0]; !isAlnum(c) {
		return fmt.Errorf("snapshot name %q starts with %q: %s", name, c, fix)
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; !isAlnum(c) && c != '.' && c != '_' && c != '-' {
			return fmt.Errorf("snapshot name %q has %q: %s", name, c, fix)
		}
	}
	return nil
}

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}

// writeAtomic writes data to path through a temporary file in the same
// directory, synced before the rename, so a reader (or a crash) sees the old
// file or the new one, never part of one.
func writeAtomic(path string, data []byte) error {
	dir, base := filepath.Split(path)
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("create a temporary file for %s: %w", path, err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// set is the files of one name found in the directory.
type set struct {
	name       string
	files      []string // full paths of the set's files present
	size       int64
	hasStart   bool
	hasEnd     bool
	start, end int64 // modification times (UnixNano) of the start and end
	oldest     int64 // of its oldest file
}

// age is the time a set is ordered by: its start, or its end if the start
// is gone, or its oldest file if both are.
func (st *set) age() int64 {
	switch {
	case st.hasStart:
		return st.start
	case st.hasEnd:
		return st.end
	}
	return st.oldest
}

// rotate deletes the oldest complete sets, never keep's, while the profiles
// in the directory total more than the cap. s.mu is held.
func (s *Store) rotate(keep string) error {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return fmt.Errorf("rotate: list %s: %w", s.dir, err)
	}
	sets := map[string]*set{}
	var total int64
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		name, kind, ok := parseFileName(e.Name())
		if !ok {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return fmt.Errorf("rotate: %w", err)
		}
		st := sets[name]
		if st == nil {
			st = &set{name: name}
			sets[name] = st
		}
		st.files = append(st.files, filepath.Join(s.dir, e.Name()))
		st.size += fi.Size()
		total += fi.Size()
		if mt := fi.ModTime().UnixNano(); len(st.files) == 1 || mt < st.oldest {
			st.oldest = mt
		}
		switch kind {
		case startSuffix:
			st.hasStart, st.start = true, fi.ModTime().UnixNano()
		case endSuffix:
			st.hasEnd, st.end = true, fi.ModTime().UnixNano()
		}
	}
	if total <= s.maxBytes {
		return nil
	}

	var done []*set
	for _, st := range sets {
		if (st.hasEnd || !st.hasStart) && st.name != keep {
			done = append(done, st)
		}
	}
	slices.SortFunc(done, func(a, b *set) int {
		return cmp.Or(cmp.Compare(a.age(), b.age()), strings.Compare(a.name, b.name))
	})
	for _, st := range done {
		if total <= s.maxBytes {
			break
		}
		// The end goes last: a set whose deletion was cut short still has
		// its end, so it still looks finished rather than like a start
		// whose worker is running.
		slices.SortStableFunc(st.files, func(a, b string) int {
			isEnd := func(f string) int {
				if strings.HasSuffix(f, endSuffix) {
					return 1
				}
				return 0
			}
			return isEnd(a) - isEnd(b)
		})
		for _, f := range st.files {
			if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("rotate: delete set %s: %w", st.name, err)
			}
		}
		total -= st.size
	}
	return nil
}

// parseFileName splits a file name the Store writes into the set's name and
// the suffix; ok is false for any other file.
func parseFileName(file string) (name, suffix string, ok bool) {
	for _, suf := range []string{startSuffix, endSuffix, diffSuffix} {
		if n, found := strings.CutSuffix(file, suf); found && ValidName(n) == nil {
			return n, suf, true
		}
	}
	return "", "", false
}

// Package procfs reads the few /proc facts the master needs about itself and
// its workers. The master measures workers itself rather than trusting what
// they report.
package procfs

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
)

// CapNetAdmin is the capability bit of CAP_NET_ADMIN.
const CapNetAdmin = 12

// Status holds fields of /proc/<pid>/status.
type Status struct {
	CapEff   uint64 // effective capabilities
	RSSBytes uint64 // VmRSS
	Threads  int
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
	var s Status
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
		case "VmRSS":
			num, unit, _ := bytes.Cut(val, []byte{' '})
			v, err := strconv.ParseUint(string(num), 10, 64)
			if err != nil {
				return nil, fmt.Errorf("parse VmRSS %q: %w", val, err)
			}
			if string(bytes.TrimSpace(unit)) == "kB" {
				v *= 1024
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

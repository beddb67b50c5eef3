package heapsnap

import (
	"bytes"
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/google/pprof/profile"
)

// baseLabel marks the samples that came from the base, as pprof's own
// -diff_base does: pprof then takes its percentages from the base's total,
// so `pprof -top diff` and `pprof -top -diff_base start end` print the same
// report. It keeps a stack's base and end samples apart in the file (the
// label is part of a sample's identity); reports add them up.
const baseLabel = "pprof::base"

// Diff returns prof minus base as a gzipped pprof protobuf: every sample of
// base negated and merged into prof, so a positive value is growth. Both
// must be profiles of the same kind (the same sample types, as two heap
// profiles of one program are).
func Diff(base, prof []byte) ([]byte, error) {
	b, err := parse(base)
	if err != nil {
		return nil, fmt.Errorf("diff heap profiles: base profile: %w", err)
	}
	p, err := parse(prof)
	if err != nil {
		return nil, fmt.Errorf("diff heap profiles: profile: %w", err)
	}
	d, err := diff(b, p)
	if err != nil {
		return nil, fmt.Errorf("diff heap profiles: %w", err)
	}
	return d, nil
}

// diffParsed is Diff of an already parsed profile against the base read
// from the file named path, named in the errors.
func diffParsed(path string, base []byte, p *profile.Profile) ([]byte, error) {
	b, err := parse(base)
	if err != nil {
		return nil, fmt.Errorf("start profile %s: %w", path, err)
	}
	return diff(b, p)
}

// diff subtracts b from p; b is changed.
func diff(b, p *profile.Profile) ([]byte, error) {
	b.SetLabel(baseLabel, []string{"true"})
	b.Scale(-1)
	d, err := profile.Merge([]*profile.Profile{p, b})
	if err != nil {
		return nil, fmt.Errorf("subtract the base: %w", err)
	}
	var buf bytes.Buffer
	if err := d.Compact().Write(&buf); err != nil {
		return nil, fmt.Errorf("encode the difference: %w", err)
	}
	return buf.Bytes(), nil
}

// An Entry is one function of a Top report.
type Entry struct {
	Func string // the function's name, as pprof prints it
	Flat int64  // the sum of the values of the samples whose leaf it is
}

// Top returns the n functions with the largest flat value of the sample
// type named sampleIndex ("inuse_space", "alloc_objects", ...; "" for the
// profile's default, as pprof chooses it), largest first, as the first n
// lines of `go tool pprof -top -sample_index=<sampleIndex>` list them.
// Functions whose flat value is zero are left out; n <= 0 returns all.
// prof may be any profile, a diff or not.
func Top(prof []byte, sampleIndex string, n int) ([]Entry, error) {
	p, err := parse(prof)
	if err != nil {
		return nil, fmt.Errorf("top of a profile: %w", err)
	}
	idx, err := sampleTypeIndex(p, sampleIndex)
	if err != nil {
		return nil, fmt.Errorf("top of a profile: %w", err)
	}
	flat := map[string]int64{}
	for _, s := range p.Sample {
		if len(s.Location) == 0 {
			continue
		}
		flat[leafName(s.Location[0])] += s.Value[idx]
	}
	top := make([]Entry, 0, len(flat))
	for f, v := range flat {
		if v != 0 {
			top = append(top, Entry{Func: f, Flat: v})
		}
	}
	slices.SortFunc(top, func(a, b Entry) int {
		return cmp.Or(cmp.Compare(b.Flat, a.Flat), strings.Compare(a.Func, b.Func))
	})
	if n > 0 && len(top) > n {
		top = top[:n]
	}
	return top, nil
}

// sampleTypeIndex finds the sample type called name, or the default one if
// name is "": the profile's DefaultSampleType, else its last, as pprof does.
func sampleTypeIndex(p *profile.Profile, name string) (int, error) {
	if name == "" {
		name = p.DefaultSampleType
		if name == "" {
			return len(p.SampleType) - 1, nil
		}
	}
	var have []string
	for i, st := range p.SampleType {
		if st.Type == name {
			return i, nil
		}
		have = append(have, st.Type)
	}
	return 0, fmt.Errorf("no sample type %q: the profile has %s", name, strings.Join(have, ", "))
}

// leafName names the innermost frame of a location: its first line (the
// others are the functions it was inlined into), or its address if it was
// never symbolized.
func leafName(l *profile.Location) string {
	if len(l.Line) > 0 && l.Line[0].Function != nil {
		return l.Line[0].Function.Name
	}
	return fmt.Sprintf("0x%x", l.Address)
}

// parse parses a profile in any format pprof reads and checks it is whole.
func parse(data []byte) (*profile.Profile, error) {
	if len(data) == 0 {
		return nil, fmt.Errorf("empty profile: expected a gzipped pprof protobuf as /debug/pprof/heap serves")
	}
	p, err := profile.ParseData(data)
	if err != nil {
		return nil, fmt.Errorf("%w: expected a gzipped pprof protobuf as /debug/pprof/heap serves", err)
	}
	if len(p.SampleType) == 0 {
		return nil, fmt.Errorf("profile has no sample types: expected a gzipped pprof protobuf as /debug/pprof/heap serves")
	}
	return p, nil
}

// gzipped returns a profile's bytes as the .pb.gz files hold them: raw as it
// came if it is gzipped already, else p encoded afresh.
func gzipped(raw []byte, p *profile.Profile) ([]byte, error) {
	if len(raw) >= 2 && raw[0] == 0x1f && raw[1] == 0x8b {
		return raw, nil
	}
	var buf bytes.Buffer
	if err := p.Write(&buf); err != nil {
		return nil, fmt.Errorf("encode the profile: %w", err)
	}
	return buf.Bytes(), nil
}

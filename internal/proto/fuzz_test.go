package proto

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"reflect"
	"testing"
)

// FuzzDecode feeds arbitrary bytes to Decode (as one payload) and to a
// Reader (as a stream of frames). Neither may panic, a Reader never holds a
// buffer beyond MaxFrame whatever a length prefix says, and whatever decodes
// survives a round trip through Encode. Seeds: testdata/fuzz/FuzzDecode.
func FuzzDecode(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		if m, err := Decode(data); err == nil {
			roundTrip(t, m)
		}
		r := NewReader(bytes.NewReader(data))
		for range 64 {
			m, err := r.Read()
			if cap(r.buf) > MaxFrame {
				t.Fatalf("reader holds %d bytes, MaxFrame is %d", cap(r.buf), MaxFrame)
			}
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
				errors.Is(err, ErrFrameTooLarge) || errors.Is(err, ErrEmptyFrame) {
				return // the stream cannot go on past these
			}
			if err == nil {
				roundTrip(t, m)
			}
		}
	})
}

// roundTrip checks that m encodes to a frame that decodes to m again.
func roundTrip(t *testing.T, m Msg) {
	t.Helper()
	frame, err := Encode(m.Type, m.Body)
	if errors.Is(err, ErrFrameTooLarge) {
		// Encoding may grow a payload near MaxFrame (json.Marshal escapes
		// '<' as \u003c): such a frame was never a writer's.
		return
	}
	if err != nil {
		t.Fatalf("decoded %s does not encode: %v (%#v)", m.Type, err, m.Body)
	}
	r := NewReader(bytes.NewReader(frame))
	got, err := r.Read()
	if err != nil {
		t.Fatalf("re-encoded %s does not decode: %v\n%s", m.Type, err, frame[4:])
	}
	normalize(m)
	normalize(got)
	if !reflect.DeepEqual(m, got) {
		t.Fatalf("round trip changed the message:\n%#v\n%#v", m.Body, got.Body)
	}
	if _, err := r.Read(); !errors.Is(err, io.EOF) {
		t.Fatalf("frame of %s has bytes after it: %v", m.Type, err)
	}
}

// normalize makes equal what the encoding cannot tell apart: an empty list
// or map left out by omitempty decodes as nil, and raw JSON is compacted
// and escaped by json.Marshal, so the spelling of an App value (whitespace,
// "<" or "\u003c") does not count.
func normalize(m Msg) {
	var stats []*Stats
	switch b := m.Body.(type) {
	case *Hello:
		if len(b.Ports) == 0 {
			b.Ports = nil
		}
	case *Heartbeat:
		stats = append(stats, &b.Stats)
	case *Status:
		if len(b.Rules) == 0 {
			b.Rules = nil
		}
		for i := range b.Workers {
			if len(b.Workers[i].Ports) == 0 {
				b.Workers[i].Ports = nil
			}
			if b.Workers[i].Stats != nil {
				stats = append(stats, b.Workers[i].Stats)
			}
		}
	}
	for _, st := range stats {
		if st.App == nil {
			continue
		}
		var buf, esc bytes.Buffer
		if json.Compact(&buf, st.App) == nil {
			json.HTMLEscape(&esc, buf.Bytes())
			st.App = esc.Bytes()
		}
	}
}

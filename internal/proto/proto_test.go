package proto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	hello := &Hello{Version: Version, Role: RoleWorker, Cluster: "c", PID: 42, Slot: 3, Generation: 2,
		Ports: []Port{{Public: 8080, Proto: "tcp", Worker: 40000}, {Public: 8080, Proto: "udp", Worker: 40001}}}
	if err := Write(&buf, TypeHello, hello); err != nil {
		t.Fatal(err)
	}
	if err := Write(&buf, TypeDie, &Reason{Reason: "stop"}); err != nil {
		t.Fatal(err)
	}
	if err := Write(&buf, TypeStatus, nil); err != nil {
		t.Fatal(err)
	}
	r := NewReader(&buf)
	m, err := r.Read()
	if err != nil {
		t.Fatal(err)
	}
	got, ok := m.Body.(*Hello)
	if !ok || got.Slot != 3 || got.Ports[0].Worker != 40000 || got.PID != 42 ||
		len(got.Ports) != 2 || got.Ports[1] != (Port{Public: 8080, Proto: "udp", Worker: 40001}) {
		t.Errorf("hello round trip: %+v", m.Body)
	}
	if m, err = r.Read(); err != nil || m.Body.(*Reason).Reason != "stop" {
		t.Errorf("die round trip: %+v %v", m, err)
	}
	if m, err = r.Read(); err != nil || m.Type != TypeStatus {
		t.Errorf("bodiless status: %+v %v", m, err)
	}
}

func frame(payload string) []byte {
	b := make([]byte, 4+len(payload))
	binary.BigEndian.PutUint32(b, uint32(len(payload)))
	copy(b[4:], payload)
	return b
}

func TestReaderRefusesBadFrames(t *testing.T) {
	for name, tc := range map[string]struct {
		in   []byte
		want error
	}{
		"oversized":     {[]byte{0x7f, 0xff, 0xff, 0xff}, ErrFrameTooLarge},
		"empty":         {[]byte{0, 0, 0, 0}, ErrEmptyFrame},
		"unknown type":  {frame(`{"type":"reboot"}`), ErrUnknownType},
		"not json":      {frame(`hello`), nil},
		"unknown field": {frame(`{"type":"die","extra":1}`), nil},
		"trailing":      {frame(`{"type":"die"}{"type":"die"}`), nil},
		"wrong body":    {frame(`{"type":"hello","body":{"slot":"x"}}`), nil},
		"truncated":     {frame(`{"type":"die"}`)[:8], nil},
	} {
		_, err := NewReader(bytes.NewReader(tc.in)).Read()
		if err == nil {
			t.Errorf("%s: accepted", name)
			continue
		}
		if tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", name, err, tc.want)
		}
	}
}

func TestEncodeRefusesOversized(t *testing.T) {
	_, err := Encode(TypeError, &Refuse{Reason: strings.Repeat("x", MaxFrame)})
	if !errors.Is(err, ErrFrameTooLarge) {
		t.Errorf("got %v", err)
	}
	if _, err := Encode("bogus", nil); !errors.Is(err, ErrUnknownType) {
		t.Errorf("unknown type encoded: %v", err)
	}
}

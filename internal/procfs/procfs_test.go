package procfs

import (
	"os"
	"testing"
)

func TestParseStatus(t *testing.T) {
	s, err := ParseStatus([]byte("Name:\tx\nThreads:\t7\nVmRSS:\t  2048 kB\nCapEff:\t0000000000001000\n"))
	if err != nil {
		t.Fatal(err)
	}
	if s.RSSBytes != 2048*1024 || s.Threads != 7 || !s.HasCap(CapNetAdmin) || s.HasCap(0) {
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

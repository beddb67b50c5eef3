//go:build linux

package proto

import (
	"errors"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// unixPair returns the two ends of a connected Unix stream socket pair.
func unixPair(t *testing.T) (a, b *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "pair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

// inode identifies the file a descriptor refers to.
func inode(t *testing.T, fd int) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatalf("fstat %d: %v", fd, err)
	}
	return st.Ino
}

// Frames without descriptors, written back to back before the one that
// carries them, arrive in one recvmsg with it: the descriptors must come
// with their own frame, not with the first of that read.
func TestDescriptorsComeWithTheirFrame(t *testing.T) {
	a, b := unixPair(t)
	files := make([]*os.File, 3)
	for i := range files {
		f, err := os.CreateTemp(t.TempDir(), "fd")
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files[i] = f
	}
	for i := 0; i < 3; i++ {
		if err := Write(a, TypeAssign, &Assign{Slot: i}); err != nil {
			t.Fatal(err)
		}
	}
	if err := WriteFDs(a, TypeAssign, &Assign{Slot: 3}, []int{int(files[0].Fd()), int(files[1].Fd())}); err != nil {
		t.Fatal(err)
	}
	if err := Write(a, TypeAssign, &Assign{Slot: 4}); err != nil {
		t.Fatal(err)
	}
	if err := WriteFDs(a, TypeAssign, &Assign{Slot: 5}, []int{int(files[2].Fd())}); err != nil {
		t.Fatal(err)
	}
	r := NewUnixReader(b)
	want := map[int][]*os.File{3: files[:2], 5: files[2:]}
	for i := 0; i < 6; i++ {
		m, err := r.Read()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if got := m.Body.(*Assign).Slot; got != i {
			t.Fatalf("frame %d is assign %d", i, got)
		}
		if len(m.FDs) != len(want[i]) {
			t.Fatalf("frame %d came with %d descriptors, want %d", i, len(m.FDs), len(want[i]))
		}
		for j, fd := range m.FDs {
			var st unix.Stat_t
			if err := unix.Fstat(int(want[i][j].Fd()), &st); err != nil {
				t.Fatal(err)
			}
			if inode(t, fd) != st.Ino {
				t.Errorf("frame %d descriptor %d is another file", i, j)
			}
			unix.Close(fd)
		}
	}
}

// Descriptors that arrive in the middle of a frame break the protocol:
// the reader closes them and fails.
func TestDescriptorsMidFrameRefused(t *testing.T) {
	a, b := unixPair(t)
	frame, err := Encode(TypeAssign, &Assign{Slot: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Write(frame[:3]); err != nil {
		t.Fatal(err)
	}
	f, err := os.CreateTemp(t.TempDir(), "fd")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := NewUnixReader(b)
	if err := r.recv(); err != nil || len(r.in) != 3 {
		t.Fatalf("first read: %d bytes, %v", len(r.in), err)
	}
	if _, _, err := a.WriteMsgUnix(frame[3:], unix.UnixRights(int(f.Fd())), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Read(); !errors.Is(err, ErrFDs) {
		t.Fatalf("read = %v, want ErrFDs", err)
	}
}

//go:build unix

package proto

// Descriptors over the control socket. Listening sockets travel as
// SCM_RIGHTS on a frame: from a worker to a master on its hello (a new
// master adopting the worker gets the worker's sockets back), from the
// master to a spare on its assign, and with the handover. A frame and its
// descriptors go in one sendmsg (WriteFDs), and a Reader made by
// NewUnixReader hands them back with that frame (Msg.FDs).
//
// The kernel attaches a sendmsg's descriptors to the first byte it sent,
// and a recvmsg that returns them stops right after the bytes of that
// send's first buffer; it may return earlier bytes before them. So the
// descriptors a recvmsg returns belong to the last frame that starts in
// the bytes it returned: the reader tracks frame boundaries to find it.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// MaxFDs is the most descriptors one frame may carry: the kernel's limit
// on one SCM_RIGHTS message (SCM_MAX_FD) is 253.
const MaxFDs = 250

// ErrFDs is returned when descriptors come in a way the protocol does not
// allow (too many, or not at the start of a frame); the reader has closed
// them.
var ErrFDs = errors.New("proto: descriptors out of place")

// WriteFDs writes one frame with fds as SCM_RIGHTS, in a single sendmsg.
// The caller keeps its own copies of fds: the receiver gets duplicates.
func WriteFDs(c *net.UnixConn, typ string, body any, fds []int) error {
	if len(fds) > MaxFDs {
		return fmt.Errorf("%w: %d descriptors in one %s frame, at most %d", ErrFDs, len(fds), typ, MaxFDs)
	}
	frame, err := Encode(typ, body)
	if err != nil {
		return err
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, _, err := c.WriteMsgUnix(frame, oob, nil)
	if err == nil && n != len(frame) {
		err = fmt.Errorf("short write of %s frame: %d of %d bytes", typ, n, len(frame))
	}
	return err
}

// NewUnixReader reads frames from a Unix stream connection with recvmsg,
// so that descriptors sent with a frame (WriteFDs) arrive in Msg.FDs.
// Descriptors the caller is not given (the connection failed first, or
// they came out of place) are closed.
func NewUnixReader(c *net.UnixConn) *Reader {
	return &Reader{uc: c}
}

// fdBatch is the descriptors of the frame that starts at stream offset at.
type fdBatch struct {
	at  int64
	fds []int
}

// readUnix returns the next frame and its descriptors.
func (r *Reader) readUnix() ([]byte, []int, error) {
	for {
		if len(r.in) >= 4 {
			n := binary.BigEndian.Uint32(r.in)
			if n == 0 {
				return nil, nil, r.fail(ErrEmptyFrame)
			}
			if n > MaxFrame {
				return nil, nil, r.fail(fmt.Errorf("%w: %d bytes", ErrFrameTooLarge, n))
			}
			if end := 4 + int(n); len(r.in) >= end {
				at := r.off
				r.buf = append(r.buf[:0], r.in[4:end]...)
				r.in = r.in[end:]
				r.off += int64(end)
				var fds []int
				for len(r.fdsAt) > 0 && r.fdsAt[0].at <= at {
					b := r.fdsAt[0]
					r.fdsAt = r.fdsAt[1:]
					if b.at == at {
						fds = append(fds, b.fds...)
					} else {
						closeAll(b.fds)
					}
				}
				return r.buf, fds, nil
			}
		}
		if err := r.recv(); err != nil {
			return nil, nil, r.fail(err)
		}
	}
}

// recv appends what one recvmsg returns to r.in, and notes where its
// descriptors belong.
func (r *Reader) recv() error {
	if r.tmp == nil {
		r.tmp = make([]byte, 64<<10)
		r.oob = make([]byte, unix.CmsgSpace(4*(MaxFDs+3)))
	}
	n, oobn, flags, _, err := r.uc.ReadMsgUnix(r.tmp, r.oob)
	n, oobn = max(n, 0), max(oobn, 0) // -1 with some errors
	var fds []int
	if oobn > 0 {
		var perr error
		fds, perr = ParseRights(r.oob[:oobn])
		if perr != nil && err == nil {
			err = perr
		}
	}
	if flags&unix.MSG_CTRUNC != 0 && err == nil {
		err = fmt.Errorf("%w: more than %d descriptors in one message", ErrFDs, MaxFDs)
	}
	old := len(r.in)
	r.in = append(r.in, r.tmp[:n]...)
	if len(fds) > 0 {
		if err != nil || n == 0 {
			closeAll(fds)
		} else if s := r.lastFrameFrom(old); s < 0 {
			closeAll(fds)
			err = fmt.Errorf("%w: %d descriptors in the middle of a frame", ErrFDs, len(fds))
		} else {
			r.fdsAt = append(r.fdsAt, fdBatch{at: r.off + int64(s), fds: fds})
		}
	}
	if err != nil {
		return err
	}
	if n == 0 {
		return io.EOF // a stream's end
	}
	return nil
}

// lastFrameFrom returns the offset in r.in of the last frame start at or
// after from, or -1 if no frame starts there.
func (r *Reader) lastFrameFrom(from int) int {
	last := -1
	for s := 0; s < len(r.in); {
		if s >= from {
			last = s
		}
		if s+4 > len(r.in) {
			break
		}
		n := binary.BigEndian.Uint32(r.in[s:])
		if n == 0 || n > MaxFrame {
			break // the frame is refused when it is reached
		}
		s += 4 + int(n)
	}
	return last
}

// fail closes the descriptors still waiting for their frame.
func (r *Reader) fail(err error) error {
	for _, b := range r.fdsAt {
		closeAll(b.fds)
	}
	r.fdsAt = nil
	return err
}

// ParseRights returns the descriptors of SCM_RIGHTS control messages. On
// error it closes those it found.
func ParseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parse control message: %w", err)
	}
	var fds []int
	for _, cm := range msgs {
		got, err := unix.ParseUnixRights(&cm)
		if err != nil {
			closeAll(fds)
			return nil, fmt.Errorf("parse SCM_RIGHTS: %w", err)
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

// CloseFDs closes descriptors a receiver will not use.
func CloseFDs(fds []int) { closeAll(fds) }

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

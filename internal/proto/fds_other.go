//go:build !unix

package proto

// Without Unix sockets' SCM_RIGHTS (Windows) no descriptor travels: the
// control protocol is Linux's (the cluster runs only there), and this
// lets the packages above it build for development mode (Config.Dev).

import (
	"errors"
	"net"
)

// MaxFDs is the most descriptors one frame may carry.
const MaxFDs = 250

// ErrFDs is returned when descriptors come in a way the protocol does not
// allow.
var ErrFDs = errors.New("proto: descriptors out of place")

var errNoFDs = errors.New("proto: descriptor passing needs Unix sockets")

type fdBatch struct {
	at  int64
	fds []int
}

// WriteFDs fails: no descriptor passing here.
func WriteFDs(c *net.UnixConn, typ string, body any, fds []int) error { return errNoFDs }

// NewUnixReader returns a Reader whose reads fail: no descriptor passing
// here.
func NewUnixReader(c *net.UnixConn) *Reader { return &Reader{uc: c} }

func (r *Reader) readUnix() ([]byte, []int, error) { return nil, nil, errNoFDs }

// ParseRights fails: no descriptor passing here.
func ParseRights(oob []byte) ([]int, error) { return nil, errNoFDs }

// CloseFDs does nothing: no descriptor is ever received here.
func CloseFDs(fds []int) {}

func closeAll(fds []int) {}

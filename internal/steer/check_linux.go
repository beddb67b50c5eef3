//go:build linux

package steer

import (
	"errors"
	"fmt"
)

// Check reports whether this process can build a Selector and attach it
// here: it loads a one-slot program, attaches it to a UDP socket of its
// own bound to an ephemeral loopback port, and sets the slot, then closes
// it all. No packet is sent. The error wraps ErrPermission or ErrKernel
// where one of them is why, and says what to do. It costs a program load
// (about a millisecond): call it once, to choose a backend.
func Check() error {
	s, err := New(Spec{Workers: 1, Name: "ipc_check"})
	if err != nil {
		return err
	}
	defer s.Close()
	c, err := ListenUDP("udp4", "127.0.0.1:0")
	if err != nil {
		var err6 error
		if c, err6 = ListenUDP("udp6", "[::1]:0"); err6 != nil {
			return fmt.Errorf("steer: check: no loopback socket to attach a program to: %w", errors.Join(err, err6))
		}
	}
	defer c.Close()
	if err := s.Attach(c); err != nil {
		return fmt.Errorf("steer: check: %w", err)
	}
	if err := s.Set(0, c); err != nil {
		return fmt.Errorf("steer: check: %w", err)
	}
	return nil
}

//go:build !plan9

package ipcluster

import (
	"errors"
	"os"
	"runtime"
	"syscall"
)

// Winsock's numbers for the same refusals: a bind on Windows fails with
// these, which syscall's E constants there are not.
const (
	wsaEACCES        = syscall.Errno(10013)
	wsaEADDRINUSE    = syscall.Errno(10048)
	wsaEADDRNOTAVAIL = syscall.Errno(10049)
)

// bindCause classifies a failed bind for devListenError.
func bindCause(err error) int {
	var e syscall.Errno
	win := runtime.GOOS == "windows" && errors.As(err, &e)
	switch {
	case errors.Is(err, os.ErrPermission) || win && e == wsaEACCES:
		return bindDenied
	case errors.Is(err, syscall.EADDRINUSE) || win && e == wsaEADDRINUSE:
		return bindInUse
	case errors.Is(err, syscall.EADDRNOTAVAIL) || win && e == wsaEADDRNOTAVAIL:
		return bindNotAvailable
	}
	return bindOther
}

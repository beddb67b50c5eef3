package ipcluster

import (
	"errors"
	"os"
)

// bindCause classifies a failed bind for devListenError. Plan 9's errors
// are strings; only a refusal is told apart.
func bindCause(err error) int {
	if errors.Is(err, os.ErrPermission) {
		return bindDenied
	}
	return bindOther
}

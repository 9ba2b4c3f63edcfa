/* The DATA reader's fast path: one pass over whole lines with memchr.
 *
 * relay/smtp/data.py is the reference and handles every case; this only answers, in
 * C, the question it asks of each network chunk when the chunk is clean, which is
 * nearly always. Pure Python needs several scans of the bytes (split, join, counts)
 * at about 1 ns per byte each, which made it the largest item in the profile at
 * 100 KiB; this does one memchr per line end and looks at a few bytes per line.
 *
 * scan(buf, max_line) -> (end, cut, dots) or None
 *   buf starts at a line start (the reader keeps it so).
 *   end:  offset of the "." line of the end marker CRLF "." CRLF, or -1.
 *   cut:  offset of the unfinished last line when end is -1 (buf[cut:] is kept for
 *         the next chunk); equal to end otherwise.
 *   dots: 1 if a line before `end`/`cut` starts with "." (dot-stuffing to undo).
 *   None: something the reference path must judge: a bare CR or LF, a line longer
 *         than max_line (its length counted with its CR, without its LF, as in
 *         data.py), or an unfinished line that is already too long or holds a CR
 *         that is not its last byte.
 *
 * Reads only inside buf; allocates only the result tuple. No state between calls.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *
scan(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t max_line;
    if (!PyArg_ParseTuple(args, "y*n", &view, &max_line))
        return NULL;
    const char *buf = view.buf;
    const char *stop = buf + view.len;
    const char *line = buf;
    Py_ssize_t end = -1;
    int dots = 0, unusual = 0;

    for (;;) {
        const char *lf = memchr(line, '\n', (size_t)(stop - line));
        if (lf == NULL)
            break;
        /* lf - line: the line's length with its CR, without its LF. */
        Py_ssize_t len = lf - line;
        if (len == 0 || lf[-1] != '\r' || len > max_line
                || memchr(line, '\r', (size_t)(len - 1)) != NULL) {
            unusual = 1;
            break;
        }
        if (line[0] == '.') {
            if (len == 2) {             /* ".\r\n": the end of the data */
                end = line - buf;
                break;
            }
            dots = 1;
        }
        line = lf + 1;
    }
    if (!unusual && end < 0) {
        Py_ssize_t rest = stop - line;
        if (rest > max_line || (rest > 1 && memchr(line, '\r', (size_t)(rest - 1)) != NULL))
            unusual = 1;
    }
    Py_ssize_t cut = end >= 0 ? end : line - buf;
    PyBuffer_Release(&view);
    if (unusual)
        Py_RETURN_NONE;
    return Py_BuildValue("(nni)", end, cut, dots);
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "scan(buf, max_line) -> (end, cut, dots) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scan", "The DATA reader's fast path.", -1, methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModule_Create(&module);
}

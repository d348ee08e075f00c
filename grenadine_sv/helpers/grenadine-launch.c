/*
 * grenadine-launch: start one program as PID 1 of new PID and mount namespaces, in a root
 * that CRIU can dump. The program runs as the child of the spec's init (PID 1), or as PID 1
 * itself when the spec has no init.
 *
 *   grenadine-launch STATUS_FD        the spec on stdin; stdout and stderr already in place
 *   grenadine-launch --serve CONTROL_FD
 *       a launch per request on the SOCK_SEQPACKET socket CONTROL_FD: `ID SPEC` with three
 *       fds (the program's stdout and stderr, the status fd); a fork launches it and, once
 *       it has ended, the answer is {"id": ID, "exit": CODE}. Up to MAX_LAUNCHES_AT_ONCE
 *       forks work at once. The server ends when the socket hangs up, after its forks.
 *
 * The spec is SandboxSpec.to_wire(): NUL-terminated `field=value` strings, lists as repeated
 * fields, fields absent when None.
 *
 * Reports on the status fd, one JSON object per line: {"pid": N} (PID 1's host pid) as soon
 * as it is forked, and {"error": "..."} if a step fails. The status fd is close-on-exec, so the
 * reader sees EOF once the launch has exited and the program has exec'ed or died.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "json_text.h"

enum {
    EXIT_STEP_FAILED = 127,
    MAX_REQUEST_BYTES = 1 << 20,
    /* Each launch is a few ms of one core's work. */
    MAX_LAUNCHES_AT_ONCE = 8,
    FDS_PER_REQUEST = 3,
    /* Room for more fds than a request has, to notice (and close) extra ones. */
    MAX_FDS_RECEIVED = 16,
    MAX_REQUEST_ID_DIGITS = 32,
};

static const char SERVE_FLAG[] = "--serve";
static const char INVALID_SPEC[] = "the sandbox launcher received an invalid spec";

/* Where a failing step reports, and the exit code of the process it ends. */
static int status_fd = -1;
static int failure_code = 1;

/* ---- memory and text ---- */

static void *grow(void *memory, size_t size)
{
    size = size ? size : 1;
    void *grown = memory ? realloc(memory, size) : malloc(size);
    if (grown == NULL)
        _exit(EXIT_STEP_FAILED);
    return grown;
}

struct text {
    char *data;
    size_t len, cap;
};

static void text_add(struct text *text, const char *bytes, size_t len)
{
    if (text->len + len + 1 > text->cap) {
        text->cap = 2 * (text->len + len + 1);
        text->data = grow(text->data, text->cap);
    }
    memcpy(text->data + text->len, bytes, len);
    text->len += len;
    text->data[text->len] = '\0';
}

static void text_addf(struct text *text, const char *format, ...)
    __attribute__((format(printf, 2, 3)));

static void text_addf(struct text *text, const char *format, ...)
{
    char small[64];
    va_list args;
    va_start(args, format);
    int len = vsnprintf(small, sizeof small, format, args);
    va_end(args);
    text_add(text, small, len < 0 ? 0 : (size_t)len);
}

static char *vformat(const char *format, va_list args)
{
    va_list copy;
    va_copy(copy, args);
    int len = vsnprintf(NULL, 0, format, copy);
    va_end(copy);
    if (len < 0)
        len = 0;
    char *formatted = grow(NULL, (size_t)len + 1);
    vsnprintf(formatted, (size_t)len + 1, format, args);
    return formatted;
}

static char *copy(const char *string)
{
    size_t size = strlen(string) + 1;
    return memcpy(grow(NULL, size), string, size);
}

static char *concat(const char *first, const char *second)
{
    struct text text = {0};
    text_add(&text, first, strlen(first));
    text_add(&text, second, strlen(second));
    return text.data;
}

/* ---- strings as Python writes them ---- */

static void append_to_text(void *text, const char *bytes, size_t len)
{
    text_add(text, bytes, len);
}

/* JSON string as Python's json.dumps writes it (ASCII only). */
static void add_json_string(struct text *out, const char *string)
{
    json_append_string(append_to_text, out, string, strlen(string));
}

/* Python's str.isprintable, for the characters a name may plausibly hold (no Unicode tables). */
static bool printable(uint32_t c)
{
    if (c < 0x20 || (c >= 0x7f && c <= 0xa0) || c == 0xad)
        return false;
    if (c >= 0xd800 && c <= 0xf8ff)
        return false;
    if (c == 0x1680 || c == 0x180e || c == 0x061c || c == 0x3000 || c == 0xfeff)
        return false;
    if ((c >= 0x2000 && c <= 0x200f) || (c >= 0x2028 && c <= 0x202f) ||
        (c >= 0x205f && c <= 0x206f) || (c >= 0xfff9 && c <= 0xfffb))
        return false;
    return true;
}

/* Python's repr() of a string: what the launcher's messages have always shown for a name. */
static char *python_repr(const char *string)
{
    char quote = strchr(string, '\'') && !strchr(string, '"') ? '"' : '\'';
    struct text out = {0};
    const unsigned char *s = (const unsigned char *)string, *end = s + strlen(string);
    text_add(&out, &quote, 1);
    while (s < end) {
        uint32_t c;
        size_t len = utf8_next_code_point(s, (size_t)(end - s), &c);
        if (c == (uint32_t)quote || c == '\\')
            text_addf(&out, "\\%c", (char)c);
        else if (c == '\n')
            text_add(&out, "\\n", 2);
        else if (c == '\r')
            text_add(&out, "\\r", 2);
        else if (c == '\t')
            text_add(&out, "\\t", 2);
        else if (printable(c))
            text_add(&out, (const char *)s, len);
        else if (c <= 0xff)
            text_addf(&out, "\\x%02x", (unsigned)c);
        else if (c <= 0xffff)
            text_addf(&out, "\\u%04x", (unsigned)c);
        else
            text_addf(&out, "\\U%08x", (unsigned)c);
        s += len;
    }
    text_add(&out, &quote, 1);
    return out.data;
}

/* ---- status reports ---- */

static void write_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t written = write(fd, data, len);
        if (written < 0 && errno == EINTR)
            continue;
        if (written <= 0)
            return;
        data += written;
        len -= (size_t)written;
    }
}

static void report_error(int fd, const char *message)
{
    struct text line = {0};
    text_add(&line, "{\"error\": ", 10);
    add_json_string(&line, message);
    text_add(&line, "}\n", 2);
    write_all(fd, line.data, line.len);
    free(line.data);
}

static void report_pid(int fd, pid_t pid)
{
    char line[64];
    int len = snprintf(line, sizeof line, "{\"pid\": %d}\n", (int)pid);
    write_all(fd, line, (size_t)len);
}

static _Noreturn void fail(const char *format, ...) __attribute__((format(printf, 1, 2)));
static _Noreturn void fail_errno(const char *format, ...) __attribute__((format(printf, 1, 2)));

/* A step failed: report the sentence and end this process. */
static _Noreturn void fail(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    report_error(status_fd, vformat(format, args));
    va_end(args);
    _exit(failure_code);
}

/* As fail, with ": " and errno's text (os.strerror's) appended. */
static _Noreturn void fail_errno(const char *format, ...)
{
    int error = errno;
    va_list args;
    va_start(args, format);
    char *what = vformat(format, args);
    va_end(args);
    fail("%s: %s", what, strerror(error));
}

/* ---- the spec ---- */

struct list {
    const char **items; /* NULL-terminated */
    size_t len;
};

static void list_push(struct list *list, const char *item)
{
    list->items = grow(list->items, (list->len + 2) * sizeof *list->items);
    list->items[list->len++] = item;
    list->items[list->len] = NULL;
}

static bool listed(const struct list *list, const char *item)
{
    for (size_t i = 0; i < list->len; i++)
        if (strcmp(list->items[i], item) == 0)
            return true;
    return false;
}

struct spec {
    struct list command, environment, binds, host_mounts, optional_mounts;
    const char *directory, *umask_text, *user, *group, *root_anchor, *init, *tmp, *cgroup;
    const char *default_path, *cgroup_root;
    mode_t umask; /* when umask_text is given */
};

static const char **single_field(struct spec *spec, const char *key)
{
    const struct {
        const char *key;
        const char **value;
    } fields[] = {
        {"directory", &spec->directory},     {"umask", &spec->umask_text},
        {"user", &spec->user},               {"group", &spec->group},
        {"root_anchor", &spec->root_anchor}, {"init", &spec->init},
        {"tmp", &spec->tmp},                 {"cgroup", &spec->cgroup},
        {"default_path", &spec->default_path}, {"cgroup_root", &spec->cgroup_root},
    };
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
        if (strcmp(fields[i].key, key) == 0)
            return fields[i].value;
    return NULL;
}

static struct list *list_field(struct spec *spec, const char *key)
{
    const struct {
        const char *key;
        struct list *list;
    } fields[] = {
        {"arg", &spec->command},         {"env", &spec->environment},
        {"bind", &spec->binds},          {"host_mount", &spec->host_mounts},
        {"optional_mount", &spec->optional_mounts},
    };
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
        if (strcmp(fields[i].key, key) == 0)
            return fields[i].list;
    return NULL;
}

static void take_entry(struct spec *spec, char *entry)
{
    char *equals = strchr(entry, '=');
    if (equals == NULL)
        fail("%s: an entry has no '=': %s", INVALID_SPEC, entry);
    *equals = '\0';
    const char *value = equals + 1;
    const char **single = single_field(spec, entry);
    struct list *list = list_field(spec, entry);
    if (single != NULL && *single != NULL)
        fail("%s: %s is given twice", INVALID_SPEC, entry);
    if (single != NULL)
        *single = value;
    else if (list != NULL)
        list_push(list, value);
    else
        fail("%s: unknown field %s", INVALID_SPEC, entry);
}

static mode_t parse_umask(const char *text)
{
    char *end;
    errno = 0;
    unsigned long value = strtoul(text, &end, 8);
    if (*text < '0' || *text > '7' || *end != '\0' || errno != 0 || value > 0777)
        fail("%s: umask %s is not an octal number up to 777", INVALID_SPEC, text);
    return (mode_t)value;
}

/* The spec in `data` (NUL-terminated entries); its strings stay in `data`. */
static void parse_spec(char *data, size_t len, struct spec *spec)
{
    *spec = (struct spec){0};
    if (len > 0 && data[len - 1] != '\0')
        fail("%s: it does not end with a NUL byte", INVALID_SPEC);
    for (size_t at = 0, entry_len; at < len; at += entry_len + 1) {
        entry_len = strlen(data + at);
        take_entry(spec, data + at);
    }
    const struct {
        const char *key;
        bool present;
    } required[] = {
        {"arg", spec->command.len > 0},   {"directory", spec->directory},
        {"root_anchor", spec->root_anchor}, {"default_path", spec->default_path},
        {"cgroup_root", spec->cgroup_root},
    };
    for (size_t i = 0; i < sizeof required / sizeof *required; i++)
        if (!required[i].present)
            fail("%s: it has no %s", INVALID_SPEC, required[i].key);
    if (spec->umask_text != NULL)
        spec->umask = parse_umask(spec->umask_text);
}

/* ---- building the root ---- */

static bool is_directory(const char *path)
{
    struct stat status;
    return stat(path, &status) == 0 && S_ISDIR(status.st_mode);
}

static bool is_file(const char *path)
{
    struct stat status;
    return stat(path, &status) == 0 && S_ISREG(status.st_mode);
}

static bool starts_with(const char *string, const char *prefix)
{
    return strncmp(string, prefix, strlen(prefix)) == 0;
}

static void bind_mount(const char *source, const char *target)
{
    if (mount(source, target, NULL, MS_BIND, NULL) != 0)
        fail_errno("cannot bind-mount %s onto %s", source, target);
}

/* Python's posixpath.dirname. */
static char *parent_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    size_t len = slash ? (size_t)(slash - path) + 1 : 0;
    size_t slashes = strspn(path, "/");
    if (len > slashes)
        while (len > 0 && path[len - 1] == '/')
            len--;
    char *parent = grow(NULL, len + 1);
    memcpy(parent, path, len);
    parent[len] = '\0';
    return parent;
}

/* mkdir -p, as Python's os.makedirs(path, exist_ok=True): 0 or an errno. */
static int make_directories(const char *path)
{
    char *parent = parent_of(path);
    int error = 0;
    if (*parent && strcmp(parent, path) != 0 && access(parent, F_OK) != 0)
        error = make_directories(parent);
    free(parent);
    if (error == 0 && mkdir(path, 0777) != 0 && !(errno == EEXIST && is_directory(path)))
        error = errno;
    return error;
}

/* Create `target` (in a private /tmp) as a directory or an empty file, like `source`. */
static void make_mount_point(const char *source, const char *target)
{
    struct stat status;
    if (lstat(target, &status) == 0)
        return;
    int error;
    if (is_directory(source)) {
        error = make_directories(target);
    } else {
        char *parent = parent_of(target);
        error = *parent ? make_directories(parent) : 0;
        free(parent);
        int fd = error ? -1 : open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0 && !error)
            error = errno;
        if (fd >= 0)
            close(fd);
    }
    if (error)
        fail("cannot create %s to bind %s: %s", target, source, strerror(error));
}

/* Undo mountinfo's octal escapes (\040 for a space...) in place. */
static void unescape_octal(char *s)
{
    char *out = s;
    for (; *s; s++) {
        if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
            s[3] >= '0' && s[3] <= '7') {
            *out++ = (char)((s[1] - '0') << 6 | (s[2] - '0') << 3 | (s[3] - '0'));
            s += 3;
        } else {
            *out++ = *s;
        }
    }
    *out = '\0';
}

/* The 5th field of a mountinfo line (the mount point), unescaped, or NULL. */
static char *mount_point_of(char *line)
{
    static const char blanks[] = " \t\n\r\v\f";
    char *saved, *field = strtok_r(line, blanks, &saved);
    for (int i = 0; field != NULL && i < 4; i++)
        field = strtok_r(NULL, blanks, &saved);
    if (field != NULL)
        unescape_octal(field);
    return field;
}

/* The cgroup mount points under `cgroup_root`, parents before children (mount order). */
static struct list host_cgroup_mounts(const char *cgroup_root)
{
    struct list points = {0};
    char *prefix = concat(cgroup_root, "/");
    FILE *mountinfo = fopen("/proc/self/mountinfo", "re");
    if (mountinfo == NULL)
        fail_errno("cannot read /proc/self/mountinfo");
    char *line = NULL;
    size_t size = 0;
    while (getline(&line, &size, mountinfo) >= 0) {
        char *point = mount_point_of(line);
        if (point == NULL || listed(&points, point))
            continue;
        if (strcmp(point, cgroup_root) == 0 || starts_with(point, prefix))
            list_push(&points, copy(point));
    }
    free(line);
    fclose(mountinfo);
    free(prefix);
    return points;
}

static void bind_host_mounts(const struct spec *spec, const char *root)
{
    for (size_t i = 0; i < spec->host_mounts.len; i++) {
        const char *path = spec->host_mounts.items[i];
        char *target = concat(root, path);
        if (spec->tmp != NULL && strcmp(path, "/tmp") == 0)
            bind_mount(spec->tmp, target);
        else if (!listed(&spec->optional_mounts, path) || is_directory(path))
            bind_mount(path, target);
        free(target);
    }
    struct list cgroups = host_cgroup_mounts(spec->cgroup_root);
    for (size_t i = 0; i < cgroups.len; i++) {
        char *target = concat(root, cgroups.items[i]);
        bind_mount(cgroups.items[i], target);
        free(target);
    }
}

static void bind_spec_binds(const struct spec *spec, const char *root)
{
    for (size_t i = 0; i < spec->binds.len; i++) {
        const char *path = spec->binds.items[i];
        char *target = concat(root, path);
        if (spec->tmp != NULL && starts_with(path, "/tmp/"))
            make_mount_point(path, target);
        bind_mount(path, target);
        free(target);
    }
}

/* Make "." the root and detach the old one (runc's trick: no put_old directory needed). */
static void pivot_root_here(void)
{
    if (syscall(SYS_pivot_root, ".", ".") != 0)
        fail_errno("cannot pivot_root into the sandbox root");
    if (umount2(".", MNT_DETACH) != 0)
        fail_errno("cannot detach the old root after pivot_root");
}

/* In this (new) mount namespace, bind the host's mounts under `root`, then pivot into it.
 * With a private tmp, that host directory is the program's /tmp; binds below /tmp go on top. */
static void build_root(const struct spec *spec, const char *root)
{
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        fail_errno("cannot make the mounts private (make-rprivate /)");
    bind_mount("/", root);
    char *proc = concat(root, "/proc");
    if (mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0)
        fail_errno("cannot mount a new proc on %s", proc);
    free(proc);
    bind_host_mounts(spec, root);
    bind_spec_binds(spec, root);
    if (chdir(root) != 0)
        fail_errno("cannot enter the sandbox root %s", root);
    pivot_root_here();
    if (chdir("/") != 0)
        fail_errno("cannot change directory to /");
}

/* ---- who the program runs as ---- */

struct identity {
    bool has_uid, has_gid;
    uid_t uid;
    gid_t gid;
    gid_t *groups; /* NULL: leave them */
    int group_count;
};

/* `name` as a number, if it is all ASCII digits (and fits). */
static bool numeric_id(const char *name, unsigned *id)
{
    if (*name == '\0' || strspn(name, "0123456789") != strlen(name))
        return false;
    errno = 0;
    unsigned long value = strtoul(name, NULL, 10);
    *id = (unsigned)value;
    return errno == 0 && value <= (unsigned)-1;
}

static const struct passwd *lookup_user(const char *name)
{
    const struct passwd *account = getpwnam(name);
    unsigned uid;
    if (account == NULL && numeric_id(name, &uid))
        account = getpwuid(uid);
    if (account == NULL)
        fail("unknown user %s: no such user in the passwd database", python_repr(name));
    return account;
}

static gid_t lookup_group(const char *name)
{
    const struct group *group = getgrnam(name);
    unsigned gid;
    if (group != NULL)
        return group->gr_gid;
    if (numeric_id(name, &gid))
        return gid;
    fail("unknown group %s: no such group in the group database", python_repr(name));
}

static void list_groups(const char *user, gid_t gid, struct identity *identity)
{
    int count = 32;
    identity->groups = grow(NULL, (size_t)count * sizeof(gid_t));
    while (getgrouplist(user, gid, identity->groups, &count) < 0)
        identity->groups = grow(identity->groups, (size_t)count * sizeof(gid_t));
    identity->group_count = count;
}

/* Resolved before fds are closed: NSS may open files. */
static struct identity resolve_identity(const char *user, const char *group)
{
    struct identity identity = {0};
    if (user != NULL) {
        const struct passwd *account = lookup_user(user);
        char *user_name = copy(account->pw_name);
        identity.has_uid = identity.has_gid = true;
        identity.uid = account->pw_uid;
        identity.gid = group == NULL ? account->pw_gid : lookup_group(group);
        list_groups(user_name, identity.gid, &identity);
        free(user_name);
    } else if (group != NULL) {
        identity.has_gid = true;
        identity.gid = lookup_group(group);
        identity.groups = grow(NULL, sizeof(gid_t));
        identity.groups[0] = identity.gid;
        identity.group_count = 1;
    }
    return identity;
}

static void assume_identity(const struct identity *identity)
{
    if (identity->has_gid && setgid(identity->gid) != 0)
        fail_errno("cannot switch to group id %u", (unsigned)identity->gid);
    if (identity->groups != NULL && setgroups((size_t)identity->group_count, identity->groups) != 0)
        fail_errno("cannot set supplementary groups");
    if (identity->has_uid && setuid(identity->uid) != 0)
        fail_errno("cannot switch to user id %u", (unsigned)identity->uid);
}

/* ---- the program ---- */

/* Close every fd above 2 but the (close-on-exec) status fd; stdin becomes /dev/null. */
static void keep_only_stdio(void)
{
    if (status_fd > 3 && close_range(3, (unsigned)status_fd - 1, 0) != 0)
        fail_errno("cannot close the fds the program must not inherit");
    if (close_range((unsigned)status_fd + 1, ~0U, 0) != 0)
        fail_errno("cannot close the fds the program must not inherit");
    int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null < 0)
        fail_errno("cannot open /dev/null inside the sandbox");
    if (null == 0) {
        fcntl(0, F_SETFD, 0);
        return;
    }
    if (dup2(null, 0) < 0)
        fail_errno("cannot make /dev/null the program's stdin");
    close(null);
}

static const char *environment_value(const struct spec *spec, const char *name)
{
    size_t len = strlen(name);
    for (size_t i = 0; i < spec->environment.len; i++) {
        const char *entry = spec->environment.items[i];
        if (strncmp(entry, name, len) == 0 && entry[len] == '=')
            return entry + len + 1;
    }
    return NULL;
}

/* os.path.join(folder or ".", name), for a name without '/'. */
static char *join_path(const char *folder, size_t folder_len, const char *name)
{
    struct text path = {0};
    if (folder_len == 0)
        text_add(&path, ".", 1);
    else
        text_add(&path, folder, folder_len);
    if (path.data[path.len - 1] != '/')
        text_add(&path, "/", 1);
    text_add(&path, name, strlen(name));
    return path.data;
}

/* The first candidate that is an executable file; `denied` gets the first that is not. */
static char *first_executable(char *candidate, char **denied)
{
    if (!is_file(candidate)) {
        free(candidate);
        return NULL;
    }
    if (access(candidate, X_OK) == 0)
        return candidate;
    if (*denied == NULL)
        *denied = candidate;
    else
        free(candidate);
    return NULL;
}

/* The executable that exec would run for `name`, searched in PATH as execvp does. */
static char *resolve(const char *name, const char *search_path)
{
    char *denied = NULL, *found = NULL;
    if (strchr(name, '/') != NULL) {
        found = first_executable(copy(name), &denied);
    } else {
        for (const char *folder = search_path; found == NULL; folder++) {
            size_t len = strcspn(folder, ":");
            found = first_executable(join_path(folder, len, name), &denied);
            folder += len;
            if (*folder == '\0')
                break;
        }
    }
    if (found != NULL)
        return found;
    if (denied != NULL)
        fail("cannot execute %s: permission denied", denied);
    if (strchr(name, '/') != NULL)
        fail("command not found: %s does not exist", name);
    fail("command not found: %s is in no directory of PATH=%s", python_repr(name), search_path);
}

/* Exec the program, or the init with the program as its only child. */
static _Noreturn void exec_program(const struct spec *spec)
{
    const char *search_path = environment_value(spec, "PATH");
    char *program = resolve(spec->command.items[0], search_path ? search_path : spec->default_path);
    struct list argv = {0};
    const char *path = program;
    if (spec->init == NULL) {
        list_push(&argv, spec->command.items[0]);
    } else {
        if (access(spec->init, X_OK) != 0)
            fail("the sandbox init %s is missing or not executable: install Debian's tini"
                 " package (apt-get install tini), or set init = false for this program",
                 spec->init);
        path = spec->init;
        list_push(&argv, spec->init);
        list_push(&argv, "--");
        list_push(&argv, program);
    }
    for (size_t i = 1; i < spec->command.len; i++)
        list_push(&argv, spec->command.items[i]);
    const char *no_environment[] = {NULL};
    execve(path, (char *const *)argv.items,
           (char *const *)(spec->environment.items ? spec->environment.items : no_environment));
    fail_errno("cannot execute %s", path);
}

/* In the forked child (PID 1 of the new PID namespace): build the sandbox and exec. */
static _Noreturn void run_program(const struct spec *spec)
{
    char *root = copy(spec->root_anchor);
    for (size_t len = strlen(root); len > 0 && root[len - 1] == '/'; len--)
        root[len - 1] = '\0';
    build_root(spec, root);
    if (setsid() < 0)
        fail_errno("cannot start a new session (setsid)");
    struct identity identity = resolve_identity(spec->user, spec->group);
    keep_only_stdio();
    if (spec->umask_text != NULL)
        umask(spec->umask);
    assume_identity(&identity);
    if (chdir(spec->directory) != 0)
        fail_errno("cannot change directory to %s", spec->directory);
    signal(SIGPIPE, SIG_DFL);
    signal(SIGXFSZ, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    exec_program(spec);
}

/* Move this process into the program's cgroup: the program it forks is born there. */
static void join_cgroup(const char *cgroup)
{
    if (cgroup == NULL)
        return;
    const char *slash = cgroup[strlen(cgroup) - 1] == '/' ? "" : "/";
    char *procs = concat(cgroup, slash);
    char *path = concat(procs, "cgroup.procs");
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0 || write(fd, "0\n", 2) != 2 || close(fd) != 0)
        fail_errno("cannot join the program's cgroup %s", cgroup);
    free(path);
    free(procs);
}

/* Create the namespaces, fork the sandbox's PID 1 (which builds the root and execs) and
 * report its pid on the status fd. Returns this process's exit code. */
static int launch(char *data, size_t len, bool truncated)
{
    failure_code = 1;
    fcntl(status_fd, F_SETFD, FD_CLOEXEC);
    signal(SIGPIPE, SIG_IGN); /* a reader gone is no reason to die mid-report */
    if (truncated)
        fail("%s: it is larger than %d bytes", INVALID_SPEC, MAX_REQUEST_BYTES);
    struct spec spec;
    parse_spec(data, len, &spec);
    join_cgroup(spec.cgroup);
    if (unshare(CLONE_NEWPID | CLONE_NEWNS) != 0)
        fail_errno("cannot create the PID and mount namespaces (unshare)");
    pid_t pid = fork();
    int error = errno;
    if (pid < 0)
        fail("the sandbox launcher failed: [Errno %d] %s", error, strerror(error));
    if (pid == 0) {
        failure_code = EXIT_STEP_FAILED;
        run_program(&spec);
    }
    report_pid(status_fd, pid);
    return 0;
}

/* ---- one launch of its own: the spec on stdin ---- */

static int launch_from_stdin(void)
{
    struct text data = {0};
    char chunk[65536];
    ssize_t got;
    while ((got = read(0, chunk, sizeof chunk)) != 0) {
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            fail_errno("the sandbox launcher cannot read its spec");
        }
        if (data.len <= MAX_REQUEST_BYTES)
            text_add(&data, chunk, (size_t)got);
    }
    return launch(data.data, data.len, data.len > MAX_REQUEST_BYTES);
}

/* ---- the server ---- */

struct running {
    int pidfd;
    pid_t pid;
    char id[MAX_REQUEST_ID_DIGITS + 1];
};

struct server {
    int control;
    bool listening;
    struct running launches[MAX_LAUNCHES_AT_ONCE];
    size_t count;
};

static bool answer(struct server *server, const char *id, int code)
{
    char message[128];
    int len = snprintf(message, sizeof message, "{\"id\": %s, \"exit\": %d}", id, code);
    return send(server->control, message, (size_t)len, MSG_NOSIGNAL) == len;
}

/* The request's id, echoed if it is all digits (else 0); returns where the spec starts. */
static size_t request_id(const char *data, size_t len, char id[MAX_REQUEST_ID_DIGITS + 1])
{
    const char *space = memchr(data, ' ', len);
    size_t id_len = space ? (size_t)(space - data) : len;
    bool digits = id_len > 0 && id_len <= MAX_REQUEST_ID_DIGITS;
    for (size_t i = 0; digits && i < id_len; i++)
        digits = data[i] >= '0' && data[i] <= '9';
    memcpy(id, digits ? data : "0", digits ? id_len : 1);
    id[digits ? id_len : 1] = '\0';
    return space ? id_len + 1 : len;
}

/* The fds a message carried, at most `room` (the rest are closed); returns their count. */
static size_t received_fds(struct msghdr *message, int *fds, size_t room)
{
    size_t count = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(message); c != NULL; c = CMSG_NXTHDR(message, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t carried = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < carried; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (count < room)
                fds[count] = fd;
            else
                close(fd);
            count++;
        }
    }
    return count;
}

/* Fork a launch of `data` with fds (stdout, stderr, status); false if the socket failed. */
static bool fork_launch(struct server *server, char *data, size_t len, bool truncated,
                        const int fds[FDS_PER_REQUEST], const char *id)
{
    pid_t child = fork();
    if (child < 0) {
        char *message = concat("the sandbox launcher cannot fork: ", strerror(errno));
        report_error(fds[2], message);
        free(message);
        return answer(server, id, EXIT_STEP_FAILED);
    }
    if (child == 0) {
        close(server->control);
        if (dup2(fds[0], 1) < 0 || dup2(fds[1], 2) < 0)
            _exit(EXIT_STEP_FAILED);
        status_fd = fds[2];
        _exit(launch(data, len, truncated));
    }
    int pidfd = (int)syscall(SYS_pidfd_open, child, 0);
    if (pidfd < 0) {
        int wait_status;
        waitpid(child, &wait_status, 0);
        return answer(server, id, EXIT_STEP_FAILED);
    }
    struct running *launch = &server->launches[server->count++];
    launch->pidfd = pidfd;
    launch->pid = child;
    strcpy(launch->id, id);
    return true;
}

/* Read one request and fork its launch; false once the supervisor has gone. */
static bool take_request(struct server *server)
{
    static char data[MAX_REQUEST_BYTES];
    union {
        struct cmsghdr align;
        char space[CMSG_SPACE(MAX_FDS_RECEIVED * sizeof(int))];
    } control;
    struct iovec buffer = {.iov_base = data, .iov_len = sizeof data};
    struct msghdr message = {.msg_iov = &buffer, .msg_iovlen = 1,
                             .msg_control = control.space, .msg_controllen = sizeof control.space};
    ssize_t got = recvmsg(server->control, &message, MSG_CMSG_CLOEXEC);
    if (got <= 0)
        return false;
    int fds[MAX_FDS_RECEIVED];
    size_t count = received_fds(&message, fds, MAX_FDS_RECEIVED);
    bool all_fds = !(message.msg_flags & MSG_CTRUNC) && count == FDS_PER_REQUEST;
    char id[MAX_REQUEST_ID_DIGITS + 1];
    size_t spec_at = request_id(data, (size_t)got, id);
    bool truncated = message.msg_flags & MSG_TRUNC;
    bool ok = all_fds ? fork_launch(server, data + spec_at, (size_t)got - spec_at, truncated,
                                    fds, id)
                      : answer(server, id, EXIT_STEP_FAILED);
    for (size_t i = 0; i < count && i < MAX_FDS_RECEIVED; i++)
        close(fds[i]);
    return ok;
}

static int exit_code(int wait_status)
{
    return WIFSIGNALED(wait_status) ? -WTERMSIG(wait_status) : WEXITSTATUS(wait_status);
}

/* Reap the launch at `index` and answer its request. */
static void finish(struct server *server, size_t index)
{
    struct running *launch = &server->launches[index];
    int wait_status = 0;
    close(launch->pidfd);
    while (waitpid(launch->pid, &wait_status, 0) < 0 && errno == EINTR)
        ;
    if (server->listening && !answer(server, launch->id, exit_code(wait_status)))
        server->listening = false;
    *launch = server->launches[--server->count];
}

static int serve(int control)
{
    struct server server = {.control = control, .listening = true};
    fcntl(control, F_SETFD, FD_CLOEXEC);
    signal(SIGPIPE, SIG_IGN);
    while (server.listening || server.count > 0) {
        struct pollfd polled[1 + MAX_LAUNCHES_AT_ONCE];
        bool full = server.count >= MAX_LAUNCHES_AT_ONCE;
        polled[0] = (struct pollfd){.fd = server.listening && !full ? control : -1,
                                    .events = POLLIN};
        for (size_t i = 0; i < server.count; i++)
            polled[1 + i] = (struct pollfd){.fd = server.launches[i].pidfd, .events = POLLIN};
        size_t count = server.count;
        if (poll(polled, 1 + count, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        for (size_t i = count; i-- > 0;) /* from the end: finish moves the last into i */
            if (polled[1 + i].revents)
                finish(&server, i);
        if (polled[0].fd >= 0 && polled[0].revents && server.listening)
            server.listening = take_request(&server);
    }
    while (server.count > 0)
        finish(&server, server.count - 1);
    return server.listening ? 1 : 0;
}

static bool parse_fd(const char *text, int *fd)
{
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    *fd = (int)value;
    return *text && *end == '\0' && errno == 0 && value >= 0 && value <= INT32_MAX;
}

int main(int argc, char **argv)
{
    int fd;
    if (argc == 3 && strcmp(argv[1], SERVE_FLAG) == 0 && parse_fd(argv[2], &fd))
        return serve(fd);
    if (argc == 2 && parse_fd(argv[1], &fd)) {
        status_fd = fd;
        return launch_from_stdin();
    }
    fprintf(stderr, "usage: %s STATUS_FD < SPEC, or %s %s CONTROL_FD\n", argv[0], argv[0],
            SERVE_FLAG);
    return 2;
}

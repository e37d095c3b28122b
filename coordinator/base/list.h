/*
 * list.h - intrusive doubly linked lists (circular, with a head sentinel):
 * O(1) insert at either end, O(1) unlink of any member, no allocation. An
 * object joins a list through a pc_list member; list_entry() gets the object
 * back. A member that is on no list has its links pointing at itself, so
 * list_unlink() is safe on it and list_linked() tells.
 */
#ifndef PAYCOORD_LIST_H
#define PAYCOORD_LIST_H

#include <stdbool.h>
#include <stddef.h>

typedef struct pc_list {
    struct pc_list *prev, *next;
} pc_list;

#define list_entry(ptr, type, member) ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

static inline void list_init(pc_list *l) { l->prev = l->next = l; }
static inline bool list_empty(const pc_list *head) { return head->next == head; }
static inline bool list_linked(const pc_list *n) { return n->next != n; }

static inline void list_insert_between(pc_list *n, pc_list *prev, pc_list *next)
{
    n->prev = prev;
    n->next = next;
    prev->next = n;
    next->prev = n;
}

static inline void list_push_tail(pc_list *head, pc_list *n) { list_insert_between(n, head->prev, head); }
static inline void list_push_head(pc_list *head, pc_list *n) { list_insert_between(n, head, head->next); }

static inline void list_unlink(pc_list *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    list_init(n);
}

/* First member, or NULL when empty. */
static inline pc_list *list_first(const pc_list *head) { return list_empty(head) ? NULL : head->next; }

static inline pc_list *list_pop_head(pc_list *head)
{
    pc_list *n = list_first(head);
    if (n)
        list_unlink(n);
    return n;
}

/* Iterate; `it` may be unlinked inside the loop body (tmp holds the next). */
#define list_each_safe(head, it, tmp) \
    for ((it) = (head)->next, (tmp) = (it)->next; (it) != (head); (it) = (tmp), (tmp) = (it)->next)

#endif
